// node-opcua holding activated sessions open while a test crowds the server: opens COUNT user sessions
// (one connection each), prints {"kind":"ready"}, waits for a line on stdin, then reads the server's
// state in each and prints {"kind":"held", statuses, lost}: lost counts connections the server closed
// meanwhile (node-opcua reconnects by itself, so a read that works is not enough). Usage:
//   node hold.js URL USER PASSWORD COUNT
const { AttributeIds } = require("node-opcua-client");
const { userSession } = require("./vision");

const [url, user, password, countText] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");

async function main() {
  const held = [];
  let lost = 0;
  for (let i = 0; i < parseInt(countText, 10); i += 1) {
    const opened = await userSession(url, user, password);
    opened.client.on("connection_lost", () => { lost += 1; });
    held.push(opened);
  }
  say({ kind: "ready" });
  await new Promise((r) => process.stdin.once("data", r));
  const statuses = [];
  for (const { session } of held) {
    const value = await session.read({ nodeId: "ns=0;i=2259", attributeId: AttributeIds.Value });
    statuses.push(value.statusCode.name);
  }
  say({ kind: "held", statuses, lost });
  for (const { client, session } of held) {
    await session.close();
    await client.disconnect();
  }
}

main().catch((error) => { say({ kind: "error", message: String(error) }); process.exit(1); });
