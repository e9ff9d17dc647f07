// node-opcua as a HMI that learns whether it may call a method by subscribing to the method's
// UserExecutable attribute (a MonitoredItem with AttributeId UserExecutable) instead of reading it. On
// each server, as an anonymous session and then as the user, it monitors UserExecutable of
// VisionStateMachine/StartSingleJob, ResultManagement/GetResultById and the Server object's
// GetMonitoredItems (i=11492), and of StartSingleJob once more created Disabled and then set to Reporting
// (which sends its value again), reads the same attributes, then changes the session's user (ActivateSession
// with the other identity: anonymous <-> the user) and prints one JSON line per server and session:
//   {kind: "subscribed", url, session: "anonymous" | "user",
//    notified: {NAME: value | "none" (no notification) | Bad status name (the item refused)},
//    read: {NAME: value}, changed: StartSingleJob's value notified after the user changed, or "none"}
// NAME: StartSingleJob, GetResultById, GetMonitoredItems, StartSingleJob (re-enabled).
// Usage: node subscribe_access.js USER PASSWORD URL...
const { AttributeIds, MessageSecurityMode, MonitoringMode, OPCUAClient, SecurityPolicy, TimestampsToReturn,
  UserTokenType, makeBrowsePath } = require("node-opcua-client");
const { NS } = require("./vision");

const [user, password, ...urls] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const REENABLED = "StartSingleJob (re-enabled)";

async function report(url, who, identity) {
  const client = OPCUAClient.create({
    endpointMustExist: false, securityMode: MessageSecurityMode.None, securityPolicy: SecurityPolicy.None,
    connectionStrategy: { maxRetry: 2, initialDelay: 200 },
  });
  await client.connect(url);
  const session = await client.createSession(identity);
  const ns = (await session.readNamespaceArray()).indexOf(NS);
  const path = async (p) => (await session.translateBrowsePath(
    makeBrowsePath("RootFolder", `/Objects/${ns}:VisionSystem${p}`))).targets[0].targetId;
  const methods = {
    StartSingleJob: await path(`/${ns}:VisionStateMachine/${ns}:StartSingleJob`),
    GetResultById: await path(`/${ns}:ResultManagement/${ns}:GetResultById`),
    GetMonitoredItems: "i=11492",
  };
  const subscription = await session.createSubscription2({
    requestedPublishingInterval: 10, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 20,
    maxNotificationsPerPublish: 100, publishingEnabled: true, priority: 10,
  });
  const notified = {};
  const latest = {};
  const monitor = async (name, nodeId, mode) => {
    const item = await subscription.monitor({ nodeId, attributeId: AttributeIds.UserExecutable },
      { samplingInterval: 0, queueSize: 10, discardOldest: true }, TimestampsToReturn.Both, mode);
    item.on("changed", (dataValue) => {
      latest[name] = dataValue.statusCode.name === "Good" ? dataValue.value.value : dataValue.statusCode.name;
      if (!(name in notified)) {
        notified[name] = dataValue.statusCode.name === "Good" ? dataValue.value.value : dataValue.statusCode.name;
      }
    });
    if (item.statusCode && item.statusCode.name !== "Good") notified[name] = item.statusCode.name;
    return item;
  };
  for (const [name, nodeId] of Object.entries(methods)) await monitor(name, nodeId, MonitoringMode.Reporting);
  const disabled = await monitor(REENABLED, methods.StartSingleJob, MonitoringMode.Disabled);
  await new Promise((r) => setTimeout(r, 300));
  if (!(REENABLED in notified)) await disabled.setMonitoringMode(MonitoringMode.Reporting);
  const names = [...Object.keys(methods), REENABLED];
  for (let waited = 0; waited < 5000 && names.some((n) => !(n in notified)); waited += 50) {
    await new Promise((r) => setTimeout(r, 50));
  }
  for (const name of names) if (!(name in notified)) notified[name] = "none";
  const values = await session.read(Object.values(methods)
    .map((nodeId) => ({ nodeId, attributeId: AttributeIds.UserExecutable })));
  const read = {};
  Object.keys(methods).forEach((name, i) => {
    read[name] = values[i].statusCode.name === "Good" ? values[i].value.value : values[i].statusCode.name;
  });
  delete latest.StartSingleJob;
  await session.changeUser(who === "anonymous" ? { type: UserTokenType.UserName, userName: user, password }
    : { type: UserTokenType.Anonymous });
  for (let waited = 0; waited < 2000 && !("StartSingleJob" in latest); waited += 50) {
    await new Promise((r) => setTimeout(r, 50));
  }
  const changed = "StartSingleJob" in latest ? latest.StartSingleJob : "none";
  say({ kind: "subscribed", url, session: who, notified, read, changed });
  await subscription.terminate();
  await session.close();
  await client.disconnect();
}

async function main() {
  for (const url of urls) {
    await report(url, "anonymous", { type: UserTokenType.Anonymous });
    await report(url, "user", { type: UserTokenType.UserName, userName: user, password });
  }
}

main().catch((error) => { say({ kind: "error", message: String(error) }); process.exit(1); });
