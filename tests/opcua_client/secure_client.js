// node-opcua as an independent OPC UA client over Basic256Sha256 Sign&Encrypt with its own certificate:
// opens a session as USER, starts one job on mrkd's VisionSystem, waits for its ResultReady event and
// prints one JSON line per thing it saw ({"kind": "error", "stage", "status", "message"} when refused).
// Its PKI (own key store, trusted server certificates) lives in PKI_FOLDER; the server's certificate
// is put there as trusted, nothing is accepted automatically. Usage:
//   node secure_client.js URL USER PASSWORD CERTIFICATE PRIVATE_KEY APPLICATION_URI PKI_FOLDER SERVER_CERTIFICATE MODE
// MODE: SignAndEncrypt (Basic256Sha256) or None (no security: the server should offer no such endpoint).
const { OPCUAClient, UserTokenType, MessageSecurityMode, SecurityPolicy } = require("node-opcua-client");
const { visionSystem, string } = require("./vision");
// node-opcua-client's own dependency (package-lock.json puts it at the top of node_modules).
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
const fs = require("fs");

const [url, user, password, certificateFile, privateKeyFile, applicationUri, pki, serverCertificate, mode] =
  process.argv.slice(2);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
let stage = "setup";

function statusOf(error) {
  // node-opcua puts the service's status in the error's message ("... BadCertificateUntrusted (0x...)")
  // and, for some services, in error.response.responseHeader.serviceResult.
  const header = error && error.response && error.response.responseHeader;
  if (header && header.serviceResult) return header.serviceResult.name;
  const match = /Bad[A-Za-z]+/.exec(String(error && error.message));
  return match ? match[0] : null;
}

async function main() {
  const certificateManager = new OPCUACertificateManager({
    rootFolder: pki, automaticallyAcceptUnknownCertificate: false, disableFileWatchers: true,
  });
  await certificateManager.initialize();
  await certificateManager.trustCertificate(fs.readFileSync(serverCertificate));   // DER
  const secure = mode === "SignAndEncrypt";
  const client = OPCUAClient.create({
    applicationName: "mrkd-test-node-opcua", applicationUri, clientCertificateManager: certificateManager,
    certificateFile, privateKeyFile, endpointMustExist: true,
    securityMode: secure ? MessageSecurityMode.SignAndEncrypt : MessageSecurityMode.None,
    securityPolicy: secure ? SecurityPolicy.Basic256Sha256 : SecurityPolicy.None,
    connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
  });
  try {
    stage = "connect";
    await client.connect(url);
    say({ kind: "connected" });
    stage = "session";
    const session = await client.createSession({ type: UserTokenType.UserName, userName: user, password });
    say({ kind: "session" });
    stage = "job";
    let received;
    const event = new Promise((resolve) => { received = resolve; });
    const { machine, start, subscription } = await visionSystem(session, (seen) => { say(seen); received(seen); });
    const result = await session.call({
      objectId: machine, methodId: start,
      inputArguments: [string("meas-secure"), string("node-secure-1"), string(""), string("")],
    });
    say({ kind: "call", status: result.statusCode.name, jobId: result.outputArguments[0] && result.outputArguments[0].value });
    if (result.statusCode.name === "Good") {
      await Promise.race([event, new Promise((r) => setTimeout(r, 10000))]);
    }
    await subscription.terminate();
    await session.close();
  } finally {
    await client.disconnect();
    await certificateManager.dispose();
  }
}

main().then(() => process.exit(0)).catch((error) => {
  say({ kind: "error", stage, status: statusOf(error), message: String(error && error.message || error) });
  process.exit(1);
});
