// node-opcua as a client written from the OPC 40100-1 nodeset (Machine Vision 1.0.0): it finds the
// automatic mode where the nodeset puts it, VisionStateMachine/AutomaticModeStateMachine with its
// 0:CurrentState, and calls StartSingleJob, StartContinuous, Stop and Abort there with the nodeset's
// argument lists; its ResultReady events carry the nodeset's mandatory fields. Driven one step at a time
// (the test releases the camera's images between steps): one command per stdin line, one JSON line out:
//   describe                      -> {kind: "describe", methods: {NAME: {inputs, outputs}}}
//                                    (each argument as [name, dataType, valueRank])
//   state                         -> {kind: "state", automatic, top}   (the two 0:CurrentState texts)
//   single|continuous PART RECIPE -> {kind: "call", name, status, outputs: [[dataType, value]], inputs}
//   stop|abort CAUSE              -> the same, Stop/Abort(Cause, CauseDescription)
//   stop-text                     -> Stop with a String where the Int32 Cause goes
//   events N                      -> {kind: "events", events}   (the first N, waited for up to 20 s)
// Usage: node spec_steps.js URL USER PASSWORD
const readline = require("readline");
const { AttributeIds, DataType, TimestampsToReturn, Variant, VariantArrayType, constructEventFilter,
  makeBrowsePath } = require("node-opcua-client");
const { NS, userSession } = require("./vision");

const [url, user, password] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const typed = (v) => [DataType[v.dataType], v.value instanceof Date ? v.value.toISOString() : v.value];
// the nodeset's ResultReadyEventType fields read here (the mandatory ones, and RecipeId, mrkd's own)
const FIELDS = ["ResultId", "JobId", "PartId", "MeasId", "RecipeId", "ExternalRecipeId", "InternalRecipeId",
                "InternalConfigurationId", "CreationTime", "IsPartial", "ResultState"];

async function main() {
  const { client, session } = await userSession(url, user, password);
  const ns = (await session.readNamespaceArray()).indexOf(NS);
  const machine = `/Objects/${ns}:VisionSystem/${ns}:VisionStateMachine`;
  const automatic = `${machine}/${ns}:AutomaticModeStateMachine`;
  const node = async (path) => {
    const found = await session.translateBrowsePath(makeBrowsePath("RootFolder", path));
    if (!found.targets || !found.targets.length) throw new Error(`${path}: ${found.statusCode.name}`);
    return found.targets[0].targetId;
  };
  const text = async (path) => {
    const value = (await session.read({ nodeId: await node(path), attributeId: AttributeIds.Value })).value.value;
    return value && value.text ? value.text : "";
  };
  const call = async (name, inputArguments) => {
    const result = await session.call({ objectId: await node(automatic),
                                        methodId: await node(`${automatic}/${ns}:${name}`), inputArguments });
    return { kind: "call", name, status: result.statusCode.name, outputs: (result.outputArguments || []).map(typed),
             inputs: (result.inputArgumentResults || []).map((s) => s.name) };
  };
  const cause = (number, description) => [new Variant({ dataType: DataType.Int32, value: number }),
                                          new Variant({ dataType: DataType.String, value: description })];
  const system = await node(`/Objects/${ns}:VisionSystem`);
  const received = [];
  const subscription = await session.createSubscription2({
    requestedPublishingInterval: 10, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 20,
    maxNotificationsPerPublish: 100, publishingEnabled: true, priority: 10,
  });
  const item = await subscription.monitor(
    { nodeId: system, attributeId: AttributeIds.EventNotifier },
    { samplingInterval: 0, queueSize: 100, filter: constructEventFilter(FIELDS.map((f) => `${ns}:${f}`)) },
    TimestampsToReturn.Both);
  item.on("changed", (values) => received.push(Object.fromEntries(FIELDS.map((f, i) => [f, typed(values[i])]))));
  await new Promise((r) => setTimeout(r, 300));
  say({ kind: "ready" });
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const [command, ...words] = line.trim().split(/\s+/);
    if (command === "describe") {
      const methods = {};
      for (const name of ["StartSingleJob", "StartContinuous", "Stop", "Abort"]) {
        const args = await session.getArgumentDefinition(await node(`${automatic}/${ns}:${name}`));
        const list = (a) => (a || []).map((x) => [x.name, x.dataType.toString(), x.valueRank]);
        methods[name] = { inputs: list(args.inputArguments), outputs: list(args.outputArguments) };
      }
      say({ kind: "describe", methods });
    } else if (command === "state") {
      say({ kind: "state", automatic: await text(`${automatic}/CurrentState`),
            top: await text(`${machine}/CurrentState`) });
    } else if (command === "single" || command === "continuous") {
      const [part, recipe] = words;
      // Parameters: the nodeset's BaseDataType[], here one name/value pair as a client may send it
      const parameters = new Variant({ dataType: DataType.Variant, arrayType: VariantArrayType.Array,
        value: [new Variant({ dataType: DataType.String, value: "exposure=1200" })] });
      say(await call(command === "single" ? "StartSingleJob" : "StartContinuous",
                     [{ dataType: DataType.String, value: `meas-${part}` }, { dataType: DataType.String, value: part },
                      { dataType: DataType.String, value: recipe === "-" ? "" : recipe },
                      { dataType: DataType.String, value: "" }, parameters]));
    } else if (command === "stop" || command === "abort") {
      say(await call(command === "stop" ? "Stop" : "Abort", cause(Number(words[0]), `asked by the MES (${words[0]})`)));
    } else if (command === "stop-text") {
      say(await call("Stop", [{ dataType: DataType.String, value: "1" }, { dataType: DataType.String, value: "x" }]));
    } else if (command === "events") {
      const count = parseInt(words[0], 10);
      for (let waited = 0; received.length < count && waited < 20000; waited += 20) {
        await new Promise((r) => setTimeout(r, 20));
      }
      say({ kind: "events", events: received.slice(0, count) });
    } else {
      say({ kind: "error", message: `unknown command ${line}` });
    }
  }
  await subscription.terminate();
  await session.close();
  await client.disconnect();
}

main().catch((error) => { say({ kind: "error", message: String(error) }); process.exit(1); });
