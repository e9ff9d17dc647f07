// What both test clients do on mrkd's VisionSystem: find its nodes and subscribe to its ResultReady
// events (each handed to onEvent as one plain object), then give the subscription a moment to start.
const { AttributeIds, DataType, MessageSecurityMode, OPCUAClient, SecurityPolicy, TimestampsToReturn,
  UserTokenType, constructEventFilter, makeBrowsePath } = require("node-opcua-client");

const NS = "urn:mrkd:machinevision";
const string = (v) => ({ dataType: DataType.String, value: v });

// A user-name session over an unsecured endpoint (the plain test line's), with its client to close.
async function userSession(url, user, password) {
  const client = OPCUAClient.create({
    endpointMustExist: false, securityMode: MessageSecurityMode.None, securityPolicy: SecurityPolicy.None,
    connectionStrategy: { maxRetry: 2, initialDelay: 200 },
  });
  await client.connect(url);
  const session = await client.createSession({ type: UserTokenType.UserName, userName: user, password });
  return { client, session };
}

async function visionSystem(session, onEvent) {
  const ns = (await session.readNamespaceArray()).indexOf(NS);
  const path = (p) => session.translateBrowsePath(makeBrowsePath("RootFolder", p)).then((r) => r.targets[0].targetId);
  const system = await path(`/Objects/${ns}:VisionSystem`);
  const machine = await path(`/Objects/${ns}:VisionSystem/${ns}:VisionStateMachine`);
  const start = await path(`/Objects/${ns}:VisionSystem/${ns}:VisionStateMachine/${ns}:StartSingleJob`);
  const subscription = await session.createSubscription2({
    requestedPublishingInterval: 10, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 20,
    maxNotificationsPerPublish: 100, publishingEnabled: true, priority: 10,
  });
  const fields = ["EventType", `${ns}:ResultId`, `${ns}:JobId`, `${ns}:ResultState`, `${ns}:PartId`,
                  `${ns}:ResultContent`, `${ns}:IsPartial`];
  const item = await subscription.monitor(
    { nodeId: system, attributeId: AttributeIds.EventNotifier },
    { samplingInterval: 0, queueSize: 100, filter: constructEventFilter(fields) }, TimestampsToReturn.Both);
  item.on("changed", (values) => onEvent({
    kind: "event", resultId: values[1].value, jobId: values[2].value, resultState: values[3].value,
    partId: values[4].value, resultContent: JSON.parse(values[5].value), isPartial: values[6].value,
  }));
  await new Promise((r) => setTimeout(r, 300));
  return { machine, start, subscription };
}

module.exports = { NS, userSession, visionSystem, string };
