// node-opcua riding out a dropped connection to mrkd's VisionSystem: one user session with its
// ResultReady events subscribed, which node-opcua re-establishes by itself on a new secure channel
// (reactivating the session, then asking Republish for what it may have missed). Records the Republish
// requests it sends with their answers, and every NotificationMessage that carried events with its
// sequence number, whether a Publish or a Republish response brought it (node-opcua hands both to the
// subscription alike, so a message that comes both ways reaches the application twice). Reads one
// command per stdin line and answers one JSON line:
//   reconnected -> {kind: "reconnected"}                 once the session is back on a new channel
//   events N    -> {kind: "events", events, messages, republishes}   the events (after the first N
//                  arrived, within 20 s, and 1.5 s more for any extra), the messages that carried them
//                  ({sequenceNumber, events} in arrival order), the Republish requests
//                  ({retransmitSequenceNumber, status}: "Good" answered with that message)
//   arrived N   -> {kind: "arrived", count}              as soon as N events have arrived (within 20 s)
//   republish SUBSCRIPTION SEQ -> {kind: "republish", status}   one Republish request (SUBSCRIPTION "own":
//                                                        this session's), its status
// Usage: node reconnect.js URL USER PASSWORD
const readline = require("readline");
const { MessageSecurityMode, OPCUAClient, RepublishRequest, SecurityPolicy, UserTokenType } = require("node-opcua-client");
const { visionSystem } = require("./vision");

const [url, user, password] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// a response's service result, also where it came as a ServiceFault (then node-opcua's error carries it)
const statusOf = (err, response) => (response ? response.responseHeader.serviceResult.name
  : (err.response && err.response.responseHeader.serviceResult.name) || String(err));

async function main() {
  const client = OPCUAClient.create({
    endpointMustExist: false, securityMode: MessageSecurityMode.None, securityPolicy: SecurityPolicy.None,
    connectionStrategy: { maxRetry: 100, initialDelay: 100, maxDelay: 500 },
  });
  let reconnected = false;
  client.on("after_reconnection", (err) => { reconnected = !err; });
  await client.connect(url);
  const session = await client.createSession({ type: UserTokenType.UserName, userName: user, password });
  const republishes = [];     // {retransmitSequenceNumber, status} of each Republish node-opcua sends
  const send = session.republish.bind(session);
  session.republish = (request, callback) => {
    const sent = { retransmitSequenceNumber: request.retransmitSequenceNumber, status: "unanswered" };
    republishes.push(sent);
    return send(request, (err, response) => { sent.status = statusOf(err, response); callback(err, response); });
  };
  const received = [];
  const messages = [];
  const { subscription } = await visionSystem(session, (event) => received.push({ resultId: event.resultId,
                                                                                  partId: event.partId }));
  // the EventFilter's fields: [1] ResultId, [4] PartId (vision.js)
  subscription.on("raw_notification", (message) => {
    const events = (message.notificationData || []).flatMap((data) => (data.events || []).map((event) => ({
      resultId: event.eventFields[1].value, partId: event.eventFields[4].value })));
    if (events.length) messages.push({ sequenceNumber: message.sequenceNumber, events });
  });
  say({ kind: "ready" });
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const [command, argument, more] = line.trim().split(/\s+/);
    if (command === "reconnected") {
      for (let i = 0; i < 300 && !reconnected; i += 1) await sleep(100);
      say({ kind: reconnected ? "reconnected" : "error", message: "no reconnection within 30 s" });
    } else if (command === "events") {
      for (let i = 0; i < 200 && received.length < parseInt(argument, 10); i += 1) await sleep(100);
      await sleep(1500);
      say({ kind: "events", events: received, messages, republishes });
    } else if (command === "arrived") {
      for (let i = 0; i < 2000 && received.length < parseInt(argument, 10); i += 1) await sleep(10);
      say({ kind: "arrived", count: received.length });
    } else if (command === "republish") {
      const request = new RepublishRequest({
        subscriptionId: argument === "own" ? subscription.subscriptionId : parseInt(argument, 10),
        retransmitSequenceNumber: parseInt(more, 10) });
      const status = await new Promise((resolve) => send(request, (err, response) => resolve(
        statusOf(err, response))));
      say({ kind: "republish", status });
    } else {
      say({ kind: "error", message: `unknown command ${line}` });
    }
  }
  await session.close();
  await client.disconnect();
}

main().catch((error) => { say({ kind: "error", message: String(error) }); process.exit(1); });
