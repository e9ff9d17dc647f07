// node-opcua as an independent OPC UA client driven one step at a time, so a test can interleave its
// steps with another peer's (mbpoll). Reads one command per stdin line and answers one JSON line:
//   state                   -> {kind: "state", currentState, automaticModeState}
//   call NAME               -> {kind: "call", name, status}        (a VisionStateMachine method, no inputs)
//   job PARTID              -> {kind: "call", name: "StartSingleJob", status, jobId}
// Usage: node steps.js URL USER PASSWORD
const readline = require("readline");
const { AttributeIds, makeBrowsePath } = require("node-opcua-client");
const { NS, userSession, string } = require("./vision");

const [url, user, password] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");

async function main() {
  const { client, session } = await userSession(url, user, password);
  const ns = (await session.readNamespaceArray()).indexOf(NS);
  const machinePath = `/Objects/${ns}:VisionSystem/${ns}:VisionStateMachine`;
  const node = (p) => session.translateBrowsePath(makeBrowsePath("RootFolder", `${machinePath}${p}`))
    .then((r) => r.targets[0].targetId);
  const machine = await node("");
  const text = async (name) => (await session.read({ nodeId: await node(`/${ns}:${name}`),
                                                     attributeId: AttributeIds.Value })).value.value.text;
  const call = (name, inputArguments) => node(`/${ns}:${name}`).then(
    (methodId) => session.call({ objectId: machine, methodId, inputArguments }));
  say({ kind: "ready" });
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const [command, argument] = line.trim().split(/\s+/);
    if (command === "state") {
      say({ kind: "state", currentState: await text("CurrentState"),
            automaticModeState: await text("AutomaticModeState") || "" });
    } else if (command === "call") {
      say({ kind: "call", name: argument, status: (await call(argument, [])).statusCode.name });
    } else if (command === "job") {
      const result = await call("StartSingleJob", [string("m"), string(argument), string(""), string("")]);
      say({ kind: "call", name: "StartSingleJob", status: result.statusCode.name,
            jobId: result.outputArguments && result.outputArguments[0] ? result.outputArguments[0].value : null });
    } else {
      say({ kind: "error", message: `unknown command ${line}` });
    }
  }
  await session.close();
  await client.disconnect();
}

main().catch((error) => { say({ kind: "error", message: String(error) }); process.exit(1); });
