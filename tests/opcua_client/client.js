// node-opcua as an independent OPC UA client: starts jobs on mrkd's VisionSystem, receives its
// ResultReady events and prints one JSON line per thing it saw. Usage:
//   node client.js URL USER PASSWORD JOBS
const { DataType } = require("node-opcua-client");
const { userSession, visionSystem, string } = require("./vision");

const [url, user, password, jobsText] = process.argv.slice(2);
const jobs = parseInt(jobsText, 10);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");

async function main() {
  const { client, session } = await userSession(url, user, password);
  const received = [];
  let waiting = null;
  const { machine, start, subscription } = await visionSystem(session, (event) => {
    received.push(event);
    say(event);
    if (waiting) { waiting(); waiting = null; }
  });
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
