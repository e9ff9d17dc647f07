// node-opcua as a careless or hostile client of mrkd's VisionSystem: method calls with arguments of the
// wrong count, kind, size and characters (line breaks, NUL, escapes), and a method called on an object it does not belong to. Prints one JSON
// line per call: its name, the call's status and the per-argument results. Usage:
//   node hostile.js URL USER PASSWORD
const { DataType, VariantArrayType, makeBrowsePath } = require("node-opcua-client");
const { NS, userSession, string } = require("./vision");

const [url, user, password] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");

async function main() {
  const { client, session } = await userSession(url, user, password);
  const ns = (await session.readNamespaceArray()).indexOf(NS);
  const node = async (p) => (await session.translateBrowsePath(
    makeBrowsePath("RootFolder", `/Objects/${ns}:VisionSystem/${p.split("/").map((n) => `${ns}:${n}`).join("/")}`)))
    .targets[0].targetId;
  const machine = await node("VisionStateMachine");
  const recipes = await node("RecipeManagement");
  const method = async (p) => node(p);
  const calls = [
    ["Stop with an argument", machine, "VisionStateMachine/Stop", [string("x")]],
    ["Halt with two arguments", machine, "VisionStateMachine/Halt", [string("x"), string("y")]],
    ["Halt on RecipeManagement", recipes, "VisionStateMachine/Halt", []],
    ["PrepareRecipe of 100000 digits", recipes, "RecipeManagement/PrepareRecipe", [string("9".repeat(100000))]],
    ["PrepareRecipe superscript two", recipes, "RecipeManagement/PrepareRecipe", [string("\u00b2")]],
    ["StartSingleJob RecipeId superscript two", machine, "VisionStateMachine/StartSingleJob",
      [string("m"), string("p"), string("\u00b2"), string("")]],
    ["StartSingleJob MeasId an array", machine, "VisionStateMachine/StartSingleJob",
      [{ dataType: DataType.String, arrayType: VariantArrayType.Array, value: ["a", "b"] }, string("p"), string(""),
        string("")]],
    ["StartSingleJob PartId of 1 MB", machine, "VisionStateMachine/StartSingleJob",
      [string("m"), string("P".repeat(1 << 20)), string(""), string("")]],
    ["StartSingleJob PartId with a line break", machine, "VisionStateMachine/StartSingleJob",
      [string("m"), string("P-1\nWARNING forged line"), string(""), string("")]],
    ["StartSingleJob MeasId with NUL", machine, "VisionStateMachine/StartSingleJob",
      [string("m\u0000"), string("p"), string(""), string("")]],
    ["StartSingleJob ProductId with an escape", machine, "VisionStateMachine/StartSingleJob",
      [string("m"), string("p"), string(""), string("\u001b[2J")]],
    ["StartSingleJob PartId with U+2028", machine, "VisionStateMachine/StartSingleJob",
      [string("m"), string("P\u20282"), string(""), string("")]],
    ["StartSingleJob", machine, "VisionStateMachine/StartSingleJob",
      [string("m"), string("hostile-ok"), string(""), string("")]],
  ];
  for (const [name, objectId, path, inputArguments] of calls) {
    const result = await session.call({ objectId, methodId: await method(path), inputArguments });
    say({ name, status: result.statusCode.name, inputs: (result.inputArgumentResults || []).map((s) => s.name) });
  }
  await session.close();
  await client.disconnect();
}

main().catch((error) => { say({ name: "error", status: String(error) }); process.exit(1); });
