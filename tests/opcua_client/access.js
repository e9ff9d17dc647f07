// node-opcua as a generic client (a HMI, UaExpert) deciding which of mrkd's methods to offer its operator:
// on each server, as an anonymous session and then as the user, it browses the VisionSystem, reads each
// method's Executable and UserExecutable and each variable's AccessLevel and UserAccessLevel, then calls
// StartSingleJob with a wrong argument type (a call that starts nothing whoever makes it) to see whether
// the server refuses it for this session. Prints one JSON line per server and session:
//   {kind: "access", url, session: "anonymous" | "user", methods: {PATH: {executable, userExecutable}},
//    variables: {PATH: {accessLevel, userAccessLevel}}, browseFields: [what Browse tells of a node], call}
// PATH: the browse names below VisionSystem joined by "/"; the Server object's GetMonitoredItems and
// ServerDiagnostics/EnabledFlag (namespace 0, writable by its AccessLevel) are there too.
// Usage: node access.js USER PASSWORD URL...
const { AttributeIds, BrowseDirection, DataType, MessageSecurityMode, NodeClass, OPCUAClient, SecurityPolicy,
  UserTokenType, makeBrowsePath } = require("node-opcua-client");
const { NS } = require("./vision");

const [user, password, ...urls] = process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const SERVER_NODES = { "Server/GetMonitoredItems": "i=11492", "Server/ServerDiagnostics/EnabledFlag": "i=2294" };

// Every Method and Variable below nodeId (hierarchical references), as {path: [nodeId, nodeClass]}.
async function below(session, nodeId, prefix, found) {
  const result = await session.browse({ nodeId, browseDirection: BrowseDirection.Forward, includeSubtypes: true,
                                        referenceTypeId: "HierarchicalReferences", resultMask: 0x3f });
  for (const reference of result.references || []) {
    const path = `${prefix}${reference.browseName.name}`;
    if (reference.nodeClass === NodeClass.Method || reference.nodeClass === NodeClass.Variable) {
      found[path] = [reference.nodeId.toString(), reference.nodeClass];
    }
    if (reference.nodeClass === NodeClass.Object) await below(session, reference.nodeId, `${path}/`, found);
  }
  return found;
}

// [Executable, UserExecutable] of each method, [AccessLevel, UserAccessLevel] of each variable, in one Read
async function attributes(session, nodes) {
  const entries = Object.entries(nodes);
  const items = entries.flatMap(([, [nodeId, nodeClass]]) => (nodeClass === NodeClass.Method
    ? [AttributeIds.Executable, AttributeIds.UserExecutable] : [AttributeIds.AccessLevel, AttributeIds.UserAccessLevel])
    .map((attributeId) => ({ nodeId, attributeId })));
  const values = (await session.read(items))
    .map((v) => (v.statusCode.name === "Good" ? v.value.value : v.statusCode.name));
  const methods = {};
  const variables = {};
  entries.forEach(([path, [, nodeClass]], i) => {
    const [own, users] = values.slice(2 * i, 2 * i + 2);
    if (nodeClass === NodeClass.Method) methods[path] = { executable: own, userExecutable: users };
    else variables[path] = { accessLevel: own, userAccessLevel: users };
  });
  return { methods, variables };
}

async function report(url, who, identity) {
  const client = OPCUAClient.create({
    endpointMustExist: false, securityMode: MessageSecurityMode.None, securityPolicy: SecurityPolicy.None,
    connectionStrategy: { maxRetry: 2, initialDelay: 200 },
  });
  await client.connect(url);
  const session = await client.createSession(identity);
  const ns = (await session.readNamespaceArray()).indexOf(NS);
  const path = async (p) => (await session.translateBrowsePath(
    makeBrowsePath("RootFolder", `/Objects/${ns}:VisionSystem${p}`))).targets[0].targetId;
  const system = await path("");
  const nodes = await below(session, system, "", {});
  for (const [name, nodeId] of Object.entries(SERVER_NODES)) {
    nodes[name] = [nodeId, name.endsWith("GetMonitoredItems") ? NodeClass.Method : NodeClass.Variable];
  }
  const { methods, variables } = await attributes(session, nodes);
  // what a Browse answer tells of a method (its ReferenceDescription): no UserExecutable among it
  const browsed = await session.browse({ nodeId: system, browseDirection: BrowseDirection.Forward, resultMask: 0x3f });
  const browseFields = Object.keys(browsed.references[0].toJSON());
  // a refused session's whole Call request is refused: node-opcua throws, naming the service result
  const call = await session.call({ objectId: await path(`/${ns}:VisionStateMachine`),
    methodId: nodes["VisionStateMachine/StartSingleJob"][0], inputArguments: [
      { dataType: DataType.Int32, value: 7 }, { dataType: DataType.String, value: "p" },
      { dataType: DataType.String, value: "" }, { dataType: DataType.String, value: "" }] })
    .then((r) => r.statusCode.name, (error) => (String(error).match(/serviceResult = (\w+)/) || [String(error)]).pop());
  say({ kind: "access", url, session: who, methods, variables, browseFields, call });
  await session.close();
  await client.disconnect();
}

async function main() {
  for (const url of urls) {
    await report(url, "anonymous", { type: UserTokenType.Anonymous });
    await report(url, "user", { type: UserTokenType.UserName, userName: user, password });
  }
}

main().catch((error) => { say({ kind: "error", message: String(error) }); process.exit(1); });
