// node-opcua as an MES driving recipes and a continuous run on mrkd's VisionSystem one step at a time,
// its ResultReady events subscribed, so a test can release the camera's images between steps. Reads one
// command per stdin line and answers one JSON line:
//   prepare ID | unprepare ID -> {kind: "call", name, status}      (RecipeManagement, ExternalId ID)
//   continuous PARTID | stop  -> {kind: "call", name, status}      (VisionStateMachine)
//   prepared                  -> {kind: "prepared", value}         (RecipeManagement/PreparedRecipe)
//   events N                  -> {kind: "events", events}          (the first N, waited for up to 20 s)
// Usage: node recipe_steps.js URL USER PASSWORD
const readline = require("readline");
const { AttributeIds, makeBrowsePath } = require("node-opcua-client");
const { NS, userSession, visionSystem, string } = require("./vision");

const [url, user, password] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");

async function main() {
  const { client, session } = await userSession(url, user, password);
  const received = [];
  const { machine } = await visionSystem(session, (event) => received.push(
    { partId: event.partId, jobId: event.jobId, recipe: event.resultContent.recipe }));
  const ns = (await session.readNamespaceArray()).indexOf(NS);
  const node = (p) => session.translateBrowsePath(makeBrowsePath("RootFolder", `/Objects/${ns}:VisionSystem/${p}`))
    .then((r) => r.targets[0].targetId);
  const recipes = await node(`${ns}:RecipeManagement`);
  const call = async (objectId, path, name, inputArguments) => {
    const result = await session.call({ objectId, methodId: await node(`${path}/${ns}:${name}`), inputArguments });
    return { kind: "call", name, status: result.statusCode.name };
  };
  say({ kind: "ready" });
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const [command, argument] = line.trim().split(/\s+/);
    if (command === "prepare" || command === "unprepare") {
      const name = command === "prepare" ? "PrepareRecipe" : "UnprepareRecipe";
      say(await call(recipes, `${ns}:RecipeManagement`, name, [string(argument)]));
    } else if (command === "continuous") {
      say(await call(machine, `${ns}:VisionStateMachine`, "StartContinuous",
                     [string("m"), string(argument), string(""), string("")]));
    } else if (command === "stop") {
      say(await call(machine, `${ns}:VisionStateMachine`, "Stop", []));
    } else if (command === "prepared") {
      const value = await session.read({ nodeId: await node(`${ns}:RecipeManagement/${ns}:PreparedRecipe`),
                                         attributeId: AttributeIds.Value });
      say({ kind: "prepared", value: value.value.value });
    } else if (command === "events") {
      const count = parseInt(argument, 10);
      for (let waited = 0; received.length < count && waited < 20000; waited += 20) {
        await new Promise((r) => setTimeout(r, 20));
      }
      say({ kind: "events", events: received.slice(0, count) });
    } else {
      say({ kind: "error", message: `unknown command ${line}` });
    }
  }
  await session.close();
  await client.disconnect();
}

main().catch((error) => { say({ kind: "error", message: String(error) }); process.exit(1); });
