// node-opcua as an independent OPC UA client: starts jobs on mrkd's VisionSystem, receives its
// ResultReady events and prints one JSON line per thing it saw. Usage:
//   node client.js URL USER PASSWORD JOBS
const {
  OPCUAClient, UserTokenType, AttributeIds, DataType, TimestampsToReturn, constructEventFilter,
  makeBrowsePath, MessageSecurityMode, SecurityPolicy,
} = require("node-opcua-client");

const [url, user, password, jobsText] = process.argv.slice(2);
const jobs = parseInt(jobsText, 10);
const NS = "urn:mrkd:machinevision";
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");

async function main() {
  const client = OPCUAClient.create({
    endpointMustExist: false, securityMode: MessageSecurityMode.None, securityPolicy: SecurityPolicy.None,
    connectionStrategy: { maxRetry: 2, initialDelay: 200 },
  });
  await client.connect(url);
  const session = await client.createSession({ type: UserTokenType.UserName, userName: user, password });
  const namespaces = await session.readNamespaceArray();
  const ns = namespaces.indexOf(NS);
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
  const received = [];
  let waiting = null;
  item.on("changed", (values) => {
    const event = {
      kind: "event", resultId: values[1].value, jobId: values[2].value, resultState: values[3].value,
      partId: values[4].value, resultContent: JSON.parse(values[5].value), isPartial: values[6].value,
    };
    received.push(event);
    say(event);
    if (waiting) { waiting(); waiting = null; }
  });
  await new Promise((r) => setTimeout(r, 300));
  const string = (v) => ({ dataType: DataType.String, value: v });
  for (let i = 0; i < jobs; i += 1) {
    const seen = received.length;
    const done = new Promise((r) => { waiting = r; });
    const result = await session.call({
      objectId: machine, methodId: start,
      inputArguments: [string(`meas-${i}`), string(`N-${i}`), string(""), string("")],
    });
    say({ kind: "call", status: result.statusCode.name, jobId: result.outputArguments[0] && result.outputArguments[0].value });
    if (result.statusCode.name !== "Good") break;
    if (received.length === seen) await Promise.race([done, new Promise((r) => setTimeout(r, 10000))]);
  }
  const wrong = await session.call({
    objectId: machine, methodId: start,
    inputArguments: [{ dataType: DataType.Int32, value: 7 }, string("x"), string(""), string("")],
  });
  say({ kind: "wrong-types", status: wrong.statusCode.name,
        inputs: (wrong.inputArgumentResults || []).map((s) => s.name) });
  await subscription.terminate();
  await session.close();
  await client.disconnect();
}

main().catch((error) => { say({ kind: "error", message: String(error) }); process.exit(1); });
