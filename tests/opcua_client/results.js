// node-opcua as an MES on mrkd's VisionSystem fetching results through ResultManagement (OPC 40100-1
// 7.10.2, the nodeset's GetResultById, GetResultListFiltered and ReleaseResultHandle): one user session
// (requested session timeout 5 s) with its ResultReady events subscribed, which node-opcua repairs by
// itself after a dropped connection (a new session when the old one is gone). Results are decoded by
// node-opcua from the server's DataTypeDefinitions (ResultDataType and its id structures). One command per
// stdin line, one JSON line out:
//   describe         -> {kind: "describe", methods: {NAME: {inputs, outputs}}}   each argument as
//                       [name, its DataType's browse name, valueRank]
//   session          -> {kind: "session", sessionId}
//   restored         -> {kind: "restored", sessionId}   once node-opcua has restored the session (30 s)
//   events N         -> {kind: "events", events}        the events (after the first N arrived, 20 s, +1 s)
//   page MAX START [PARTID] -> {kind: "page", status, isComplete, resultCount, handle, results}
//                       one GetResultListFiltered (ResultState 0, the other filters null, or PartId's Id)
//   missed LAST MAX  -> {kind: "missed", results, pages}   what a reconnecting MES does: pages of MAX from
//                       StartIndex 0 (newest first) until one is ResultId LAST or the list is complete;
//                       the results after LAST, oldest first, once each; pages: [StartIndex, ResultIds]
//   byid ID          -> {kind: "byid", status, handle, result}   GetResultById(ResultIdDataType{Id: ID})
//   byid-text ID     -> the same with a String ResultId
//   release HANDLE   -> {kind: "release", status, outputs}
// each result as {resultId, partId, jobId, resultState, verdict (ResultContent's), creationTime, type}
// Usage: node results.js URL USER PASSWORD
const readline = require("readline");
const { AttributeIds, DataType, MessageSecurityMode, OPCUAClient, SecurityPolicy, UserTokenType, Variant,
  makeBrowsePath } = require("node-opcua-client");
const { NS, visionSystem } = require("./vision");

const [url, user, password] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const METHODS = ["GetResultById", "GetResultListFiltered", "ReleaseResultHandle"];

const plain = (r) => ({
  resultId: r.resultId.id, partId: r.partId && r.partId.id, jobId: r.jobId.id, resultState: r.resultState,
  verdict: JSON.parse(r.resultContent[0].value).verdict, creationTime: r.creationTime.toISOString(),
  type: r.constructor.name });

async function main() {
  const client = OPCUAClient.create({
    endpointMustExist: false, securityMode: MessageSecurityMode.None, securityPolicy: SecurityPolicy.None,
    requestedSessionTimeout: 5000, connectionStrategy: { maxRetry: 200, initialDelay: 100, maxDelay: 500 },
  });
  await client.connect(url);
  const session = await client.createSession({ type: UserTokenType.UserName, userName: user, password });
  let restored = false;
  session.on("session_restored", () => { restored = true; });
  const received = [];
  await visionSystem(session, (event) => received.push({ resultId: event.resultId, partId: event.partId }));
  const ns = (await session.readNamespaceArray()).indexOf(NS);
  const node = async (path) => {
    const found = await session.translateBrowsePath(makeBrowsePath("RootFolder", path));
    if (!found.targets || !found.targets.length) throw new Error(`${path}: ${found.statusCode.name}`);
    return found.targets[0].targetId;
  };
  const management = `/Objects/${ns}:VisionSystem/${ns}:ResultManagement`;
  const objectId = await node(management);
  const methodIds = {};
  for (const name of METHODS) methodIds[name] = await node(`${management}/${ns}:${name}`);
  const definitions = {};
  for (const name of METHODS) definitions[name] = await session.getArgumentDefinition(methodIds[name]);
  const call = (name, inputArguments) => session.call({ objectId, methodId: methodIds[name], inputArguments });
  const typeOf = (name, argument) => definitions[name].inputArguments.find((a) => a.name === argument).dataType;
  const struct = async (name, argument, id) => new Variant({ dataType: DataType.ExtensionObject,
    value: await session.constructExtensionObject(typeOf(name, argument), { id }) });
  const nothing = () => new Variant({ dataType: DataType.ExtensionObject, value: null });

  const page = async (max, start, partId) => {
    const filters = [];
    for (const a of definitions.GetResultListFiltered.inputArguments.slice(1, 9)) {
      filters.push(a.name === "PartId" && partId ? await struct("GetResultListFiltered", "PartId", partId) : nothing());
    }
    const result = await call("GetResultListFiltered", [
      new Variant({ dataType: DataType.Int32, value: 0 }), ...filters,
      new Variant({ dataType: DataType.UInt32, value: max }), new Variant({ dataType: DataType.UInt32, value: start }),
      new Variant({ dataType: DataType.Int32, value: -1 })]);
    const out = result.outputArguments || [];
    return { kind: "page", status: result.statusCode.name, isComplete: out.length ? out[0].value : null,
             resultCount: out.length ? out[1].value : null, handle: out.length ? out[2].value : null,
             results: out.length ? out[3].value.map(plain) : [] };
  };

  say({ kind: "ready" });
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const [command, first, second, third] = line.trim().split(/\s+/);
    try {
      if (command === "describe") {
        const methods = {};
        for (const name of METHODS) {
          const described = async (args) => Promise.all((args || []).map(async (a) => [a.name,
            (await session.read({ nodeId: a.dataType, attributeId: AttributeIds.BrowseName })).value.value.name,
            a.valueRank]));
          methods[name] = { inputs: await described(definitions[name].inputArguments),
                            outputs: await described(definitions[name].outputArguments) };
        }
        say({ kind: "describe", methods });
      } else if (command === "session") {
        say({ kind: "session", sessionId: session.sessionId.toString() });
      } else if (command === "restored") {
        for (let i = 0; i < 300 && !restored; i += 1) await sleep(100);
        say(restored ? { kind: "restored", sessionId: session.sessionId.toString() }
          : { kind: "error", message: "session not restored within 30 s" });
      } else if (command === "events") {
        for (let i = 0; i < 200 && received.length < parseInt(first, 10); i += 1) await sleep(100);
        await sleep(1000);
        say({ kind: "events", events: received });
      } else if (command === "page") {
        say(await page(parseInt(first, 10), parseInt(second, 10), third));
      } else if (command === "missed") {
        // ResultIds are names, not numbers (OPC 40100: a system-wide unique TrimmedString): the client
        // keeps the last one it had and pages back from the newest until it meets it
        const last = first;
        const max = parseInt(second, 10);
        const found = new Map();
        const pages = [];
        let met = false;
        for (let start = 0; !met; start += max) {
          const got = await page(max, start);
          if (got.status !== "Good") throw new Error(`GetResultListFiltered: ${got.status}`);
          pages.push([start, got.results.map((r) => r.resultId)]);
          for (const r of got.results) {
            if (r.resultId === last) { met = true; break; }
            if (!found.has(r.resultId)) found.set(r.resultId, r);
          }
          if (got.isComplete) break;
        }
        const results = [...found.values()].reverse();
        say({ kind: "missed", results, pages });
      } else if (command === "byid" || command === "byid-text") {
        const id = command === "byid" ? await struct("GetResultById", "ResultId", first)
          : new Variant({ dataType: DataType.String, value: first });
        const result = await call("GetResultById", [id, new Variant({ dataType: DataType.Int32, value: 0 })]);
        const out = result.outputArguments || [];
        say({ kind: "byid", status: result.statusCode.name, handle: out.length ? out[0].value : null,
              result: out.length ? plain(out[1].value) : null, error: out.length ? out[2].value : null });
      } else if (command === "release") {
        const result = await call("ReleaseResultHandle",
          [new Variant({ dataType: DataType.UInt32, value: parseInt(first, 10) })]);
        say({ kind: "release", status: result.statusCode.name,
              outputs: (result.outputArguments || []).map((v) => v.value) });
      } else {
        say({ kind: "error", message: `unknown command ${line}` });
      }
    } catch (err) {
      say({ kind: "error", message: String(err && err.stack || err) });
    }
  }
  await session.close();
  await client.disconnect();
}

main().catch((err) => { say({ kind: "error", message: String(err && err.stack || err) }); process.exit(1); });
