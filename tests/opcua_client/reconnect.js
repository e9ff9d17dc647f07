// node-opcua riding out a dropped connection to mrkd's VisionSystem: one user session with its
// ResultReady events subscribed, which node-opcua re-establishes by itself on a new secure channel
// (reactivating the session, then asking Republish for what it may have missed). Counts the Republish
// requests it sends. Reads one command per stdin line and answers one JSON line:
//   reconnected -> {kind: "reconnected"}                 once the session is back on a new channel
//   events N    -> {kind: "events", events, republish}   the events (after the first N arrived, within
//                                                        20 s, and 1.5 s more for any extra), Republish count
//   republish SUBSCRIPTION SEQ -> {kind: "republish", status}   one Republish request (SUBSCRIPTION "own":
//                                                        this session's), its status
// Usage: node reconnect.js URL USER PASSWORD
const readline = require("readline");
const { MessageSecurityMode, OPCUAClient, RepublishRequest, SecurityPolicy, UserTokenType } = require("node-opcua-client");
const { visionSystem } = require("./vision");

const [url, user, password] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const client = OPCUAClient.create({
    endpointMustExist: false, securityMode: MessageSecurityMode.None, securityPolicy: SecurityPolicy.None,
    connectionStrategy: { maxRetry: 100, initialDelay: 100, maxDelay: 500 },
  });
  let reconnected = false;
  client.on("after_reconnection", (err) => { reconnected = !err; });
  await client.connect(url);
  const session = await client.createSession({ type: UserTokenType.UserName, userName: user, password });
  let republish = 0;
  const send = session.republish.bind(session);
  session.republish = (...args) => { republish += 1; return send(...args); };
  const received = [];
  const { subscription } = await visionSystem(session, (event) => received.push({ resultId: event.resultId,
                                                                                  partId: event.partId }));
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
      say({ kind: "events", events: received, republish });
    } else if (command === "republish") {
      const request = new RepublishRequest({
        subscriptionId: argument === "own" ? subscription.subscriptionId : parseInt(argument, 10),
        retransmitSequenceNumber: parseInt(more, 10) });
      const status = await new Promise((resolve) => send(request, (err, response) => resolve(
        response ? response.responseHeader.serviceResult.name
          : (err.response && err.response.responseHeader.serviceResult.name) || String(err))));
      say({ kind: "republish", status });
    } else {
      say({ kind: "error", message: `unknown command ${line}` });
    }
  }
  await session.close();
  await client.disconnect();
}

main().catch((error) => { say({ kind: "error", message: String(error) }); process.exit(1); });
