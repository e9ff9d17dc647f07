"""OPC UA adapter: a ``VisionSystem`` object after OPC 40100-1 (OPC UA for Machine Vision) over asyncua.

What it serves (a subset built by hand, in namespace ``urn:mrkd:machinevision``, with the spec's
browse names; docs/PLC.md lists it):

* ``VisionSystem/VisionStateMachine``: ``CurrentState`` (Preoperational, Halted, Error,
  Operational) and ``AutomaticModeState`` (Initialized, Ready, SingleExecution,
  ContinuousExecution); methods ``SelectModeAutomatic``, ``Halt``, ``Reset``, ``StartSingleJob``,
  ``StartContinuous``, ``Stop``, ``Abort``. The system starts Operational / Ready with recipe 0.
  Out of Operational the state machine holds the line's one offline (runtime/plc/offline.py); while
  another interface holds it (a Modbus PLC's Set Offline) an Operational system shows Preoperational
  (OPC 40100-1's automatic transition), refuses jobs and SelectModeAutomatic with BadInvalidState, and
  goes back to Operational / Ready by itself when that hold is released.
  Where the Machine Vision nodeset (VisionStateMachineType) puts them too, for clients generated from it:
  the states as ``0:CurrentState`` of ``VisionStateMachine`` and of
  ``VisionStateMachine/AutomaticModeStateMachine``, which has ``StartSingleJob``, ``StartContinuous``
  (the nodeset's inputs: ``Parameters`` too, accepted and not used) and ``Stop``, ``Abort`` (``Cause``,
  ``CauseDescription``, accepted and not used), each with the ``Error`` output (0; a refused call answers
  its Bad status code), running the same code as the methods on ``VisionStateMachine``.
* ``VisionSystem/RecipeManagement``: ``PrepareRecipe(ExternalId)`` selects a recipe of the line file
  for the next jobs, ``UnprepareRecipe`` of the prepared recipe goes back to recipe 0 (the spec's Ready ->
  Initialized is not modelled: recipe 0 is always there); neither while a job runs, and a continuous run
  keeps the recipe it started with; recipes are the line file's, there is no ``AddRecipe`` at run
  time (BadNotSupported).
* ``VisionSystem/ResultManagement/LastResult``: the last judged part as variables (for clients that
  poll), and a ``ResultReadyEventType`` event per judged part emitted by ``VisionSystem`` with
  ResultId (``<run id>-<inspection id>``: system-wide unique as the spec asks, so never the id of
  another run's result; JobIds likewise), JobId, IsPartial, ResultState (processing state: 1 completed,
  4 failed for an ERROR part: OK/NG is not a processing state), PartId, MeasId, RecipeId and ResultContent
  (one JSON text: verdict OK/NG/ERROR, score, threshold, per-camera scores, error), and the nodeset's
  CreationTime (when the verdict was made), ExternalRecipeId and InternalRecipeId (both the recipe
  number, as RecipeId) and InternalConfigurationId (the SHA-256 of the model that judged the part).
  Beside it, for a client that missed events (its session ended while it was away), the nodeset's
  ``GetResultById``, ``GetResultListFiltered`` (newest first, paged) and ``ReleaseResultHandle`` over the
  last ``RESULT_HISTORY`` results of the run, as the nodeset's ResultDataType (runtime/plc/opcua_results.py);
  anyone who may read may call them.

The spec's structured id types (MeasIdDataType, PartIdDataType, ...) are plain Strings here, but in the
result methods, which take and return them as the nodeset declares them.

A client whose connection drops keeps its session and subscriptions (asyncua) and reactivates them on a
new channel: the events of parts judged meanwhile wait for its first Publish there (a closed
connection's queued Publish requests are dropped), and Republish answers as OPC 10000-4 says
(runtime/plc/opcua_republish.py), so a client asking for what it missed is told when there is no more.

Security: bind 127.0.0.1 by default. With a server certificate and private key the only endpoint is
Basic256Sha256 Sign&Encrypt (the application URI is read from the certificate); without them, the
None policy only. With a trust folder (``trust``: runtime/plc/trust.py; certificates and the CRLs of
the certificate authorities among them; intermediate authorities in its ``issuers`` subfolder; read
again when it changes) a client whose certificate is neither one of those files nor issued through a
chain ending at one of those authorities, or is revoked, under a CRL past its nextUpdate, or outside
its validity dates, is refused when it creates its session (BadCertificateUntrusted /
BadCertificateRevoked / BadCertificateRevocationUnknown / BadCertificateTimeInvalid, ...), and
so is a session whose secure channel's own certificate is not trusted; without one, any client
certificate is accepted (the channel is still encrypted). With a certificate, asyncua's None channel (kept for
discovery) cannot activate a session (BadSecurityModeRejected). A user name and a
password taken from an environment variable (compared in constant time) may call methods; anonymous
clients may browse, read and subscribe, call the result methods, and call the others only when
``anonymous_calls`` is set; nobody may write. A method's UserExecutable, read by a session or sent to a
MonitoredItem on it in that session's subscription, says whether that session may call it (false for an
anonymous session on the methods it is refused; Executable stays true), so a generic client (a HMI) does
not offer them. Arguments of the wrong type answer BadInvalidArgument
with BadTypeMismatch per argument. A subscription is its session's: another session's subscription
services on its id answer BadSubscriptionIdInvalid, and TransferSubscriptions moves it only to a
session of the same user name, never an anonymous one (BadUserAccessDenied). A session's
AuthenticationToken, by which a client reconnecting on a new secure channel reactivates it, is 32 random
bytes (asyncua counted them: the next client took a session by the token before its own;
runtime/plc/opcua_sessions.py).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hmac
import json
import logging
import math
import os
import socket
import threading
from datetime import datetime, timezone
from collections import deque
from typing import Deque, Dict, Optional, Tuple
from urllib.parse import urlparse

import mrkd
from mrkd.runtime.line.trigger import TriggerTarget, has_control_characters
from mrkd.runtime.outputs.base import LineObserver, OutputHealth, PartResult, TriggerReceipt, Verdict
from mrkd.runtime.plc import PlcError, known_host
from mrkd.runtime.plc.aio import AsyncioServerThread
from mrkd.runtime.plc.offline import LineOffline, OfflineHolder
from mrkd.runtime.plc.opcua_republish import answer_republish_as_specified
from mrkd.runtime.plc.opcua_results import (ID_FILTERS, MAX_LIST_RESULTS, RESULT_HISTORY, ResultHistory,
                                            build_result_types, result_data)
from mrkd.runtime.plc.opcua_sessions import own_subscriptions_only, secret_session_tokens, session_of
from mrkd.runtime.plc.trust import TrustFolder, refusal_said

logger = logging.getLogger(__name__)

NAMESPACE = "urn:mrkd:machinevision"
PRODUCT_URI = "urn:mrkd"
DEFAULT_PORT = 4840
RESULT_COMPLETED, RESULT_FAILED = 1, 4          # OPC 40100-1 ResultStateDataType (processing state)
JOB_INPUTS = ("MeasId", "PartId", "RecipeId", "ProductId")
# What a method's inputs are (_arguments): ID a scalar String the method uses; the nodeset's inputs that
# the cell has no use for are only checked for their type: TEXT a scalar String, INT32 a scalar Int32,
# ARRAY an array of anything (or null, an empty one); and used too: STRUCT_ID one of the nodeset's id
# structures (its Id), a String, or null (""), NUMBER a scalar Int32, COUNT a scalar UInt32
ID, TEXT, INT32, ARRAY, STRUCT_ID, NUMBER, COUNT = "id", "text", "int32", "array", "struct id", "number", "count"
USED = (ID, STRUCT_ID, NUMBER, COUNT)
SPEC_JOB = (ID, ID, ID, ID, ARRAY)      # MeasId, PartId, RecipeId, ProductId, Parameters
SPEC_CAUSE = (INT32, TEXT)              # Cause, CauseDescription
GET_RESULT = (STRUCT_ID, INT32)         # ResultId, Timeout
# ResultState, MeasId ... JobId (ID_FILTERS), MaxResults, StartIndex, Timeout
GET_RESULT_LIST = (NUMBER,) + (STRUCT_ID,) * len(ID_FILTERS) + (COUNT, COUNT, INT32)
# A String argument longer than this is refused (BadOutOfRange for it): an id travels into every event,
# result and log line of its part, and the line holds several parts' results.
MAX_ARGUMENT_CHARS = 1024
MAX_RECIPE_DIGITS = 9
MAX_CONNECTIONS = 32            # as the Modbus server: past it the oldest without a session is closed
ACTIVATION_DEADLINE_S = 10.0    # a connection without an activated session is closed after this


def parse_opcua_url(text: str, name: str = "--opcua"):
    """'opc.tcp://HOST:PORT' -> (host, port); PlcError naming the text (and ``name``, the option or
    line-file field it came from)."""
    url = urlparse(str(text))
    try:
        port = url.port if url.port is not None else DEFAULT_PORT
    except ValueError:
        port = -1
    if url.scheme != "opc.tcp" or not url.hostname or not 0 <= port < 65536:
        raise PlcError(f"{name} must look like opc.tcp://HOST:PORT (e.g. opc.tcp://127.0.0.1:4840), got {text!r}")
    if url.path not in ("", "/", "/mrkd", "/mrkd/") or url.query or url.fragment:
        # the endpoint's path is fixed: a client told another one would not find the server
        raise PlcError(f"{name} {text}: the server's endpoint is always opc.tcp://HOST:PORT/mrkd/; give "
                       f"opc.tcp://{url.hostname}:{port}")
    if not known_host(url.hostname):      # said here, not as "cannot listen" after the models loaded
        raise PlcError(f"{name} must look like opc.tcp://HOST:PORT, HOST an address of this machine (e.g. "
                       f"opc.tcp://127.0.0.1:4840), got {text!r}: {url.hostname!r} is no IP address or host name "
                       f"this machine knows")
    return url.hostname, port


class OpcUaPlc(AsyncioServerThread, LineObserver):
    """The VisionSystem server of one ``TriggerTarget`` (module docstring); a line observer too.
    ``start()`` listens (PlcError when it cannot), ``close()`` stops; ``url`` is where it listens
    (port 0 asks for a free one)."""

    answers_plc = True       # told of triggers and parts on the spot, the others later (base.plc_and_others)

    def __init__(self, target: TriggerTarget, url: str = f"opc.tcp://127.0.0.1:{DEFAULT_PORT}",
                 user: Optional[str] = None, password: Optional[str] = None, anonymous_calls: bool = False,
                 certificate: Optional[str] = None, private_key: Optional[str] = None, trust: Optional[str] = None,
                 result_history: int = RESULT_HISTORY):
        self.target = target
        self.host, self.port = parse_opcua_url(url)
        if (user is None) != (password is None):
            raise PlcError("OPC UA: a user needs a password (from an environment variable) and a password a user")
        self.user, self._password, self.anonymous_calls = user, password, anonymous_calls
        if (certificate is None) != (private_key is None):
            raise PlcError("OPC UA: a certificate needs its private key and a private key its certificate")
        self.certificate, self.private_key = certificate, private_key
        if trust is not None and certificate is None:
            raise PlcError("OPC UA: a trust folder of client certificates needs the server's certificate and key "
                           "(Basic256Sha256 Sign&Encrypt)")
        self.trusted = TrustFolder(trust) if trust is not None else None
        self.url: Optional[str] = None
        # the state machine's own state; clients read _shown() (another interface may hold the line offline)
        self.state, self.mode = "Operational", "Ready"
        self.offline = LineOffline.of(target)      # shared with the line's other interfaces
        self.offline.subscribe(self._line_offline_changed)
        self.recipe = int(target.active_recipe)
        self.results = self.jobs = 0
        # (part id, trigger time) -> (job id, MeasId, ProductId) waiting for that part's result. The
        # trigger's time is in its receipt and in its PartResult: a part another source triggered with the
        # same id (stdin, a Modbus PLC) is never taken for a job's part.
        self._jobs: Dict[Tuple[str, float], Deque[Tuple[str, str, str]]] = {}
        self._single_job: Optional[str] = None     # the StartSingleJob whose result ends SingleExecution
        self._continuous: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server = None
        self._error: Optional[BaseException] = None
        self._closed = False
        self._connections: Optional["_Connections"] = None    # asyncua's connection list, where it could be wrapped
        self._nodes: dict = {}
        self.history = ResultHistory(result_history)     # what GetResultById / GetResultListFiltered find
        self._result_types: dict = {}
        self._handles = 0                          # ResultHandles handed out (they hold nothing)
        self._rules: Optional["_Rules"] = None
        self._publishing = 0                       # results handed to the loop, their event not yet queued
        self._publishing_lock = threading.Lock()

    # ------------------------------------------------------------ server
    def start(self) -> "OpcUaPlc":
        from mrkd.deps import require
        require("asyncua", "the OPC UA server (--opcua) needs asyncua")
        _quiet_vanished_clients()
        self._start_loop("opcua", 60)
        if self._error is not None or self.url is None:
            raise PlcError(f"--opcua opc.tcp://{self.host}:{self.port}: cannot listen there "
                           f"({self._error or 'no answer'})")
        return self

    async def _listen(self) -> None:
        from asyncua import Server, ua
        from asyncua.common.utils import ServiceError
        from asyncua.crypto.permission_rules import User, UserRole

        plc = self

        class Users:
            def get_user(self, iserver, username=None, password=None, certificate=None):
                # ``certificate``: the secure channel's client certificate (DER; None on a None channel).
                # asyncua keeps a None channel open for discovery even when no None endpoint is offered,
                # and its CreateSession check sees only the certificate the request presents: a session
                # is admitted only over an encrypted channel whose own certificate is trusted.
                if plc.certificate and not certificate:
                    raise ServiceError(ua.StatusCodes.BadSecurityModeRejected)
                refusal = plc.trusted.refusal(bytes(certificate)) if plc.trusted is not None else None
                if refusal is not None:
                    raise ServiceError(getattr(ua.StatusCodes, refusal))
                if username is None:
                    return User(role=UserRole.Anonymous)
                if plc.user is None:
                    return None
                # Both compared always: skipping the password's for a wrong name told by the answer's time
                # whether a name was right.
                user_matches = hmac.compare_digest(str(username).encode(), plc.user.encode())
                password_matches = hmac.compare_digest(str(password or "").encode(), plc._password.encode())
                return User(role=UserRole.User, name=username) if user_matches and password_matches else None

        server = self._server = Server(user_manager=Users())
        await server.init()
        # asyncua's own bounds (1000 connections, 30 s to activate) let idle sockets and sessions that
        # never activate hold file descriptors the cameras and outputs share; a cell has a PLC or a few
        server.iserver.max_connections = MAX_CONNECTIONS
        server.iserver.max_pending_activation_seconds = ACTIVATION_DEADLINE_S
        # a client back from a dropped connection asks Republish until told there is nothing more
        if not answer_republish_as_specified(server.iserver.subscription_service):
            logger.warning("opcua: this asyncua keeps its subscriptions elsewhere: a client reconnecting after "
                           "a dropped connection may repeat Republish requests")
        # a subscription is its session's: another client's calls on its id are refused as for an unknown id
        if not own_subscriptions_only(server.iserver):
            logger.warning("opcua: this asyncua creates its sessions elsewhere: any client may change or delete "
                           "another session's subscriptions")
        if not secret_session_tokens(server.iserver):
            logger.warning("opcua: this asyncua creates its sessions elsewhere: their AuthenticationTokens are "
                           "counted, and another client may reactivate a session it guessed")
        server.set_endpoint(f"opc.tcp://{self.host}:{self.port}/mrkd/")
        server.set_server_name("mrkd VisionSystem")
        # what an asset inventory records (asyncua's own said FreeOpcUa Python Server 1.0pre, built now)
        await server.set_build_info(PRODUCT_URI, "mrkd", "mrkd VisionSystem", mrkd.__version__,
                                    mrkd.__version__, _build_date())
        if self.certificate:
            await server.load_certificate(self.certificate)
            await server.load_private_key(self.private_key)
            await server.set_application_uri(_certificate_uri(self.certificate))
            policies = [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt]
            if self.trusted is not None:
                server.set_certificate_validator(_Validator(self.trusted).validate)
        else:
            await server.set_application_uri(f"urn:mrkd:{socket.gethostname()}:VisionSystem")
            policies = [ua.SecurityPolicyType.NoSecurity]
        self._rules = _Rules(self.anonymous_calls)
        server.set_security_policy(policies, permission_ruleset=self._rules)
        if not _user_executable_per_session(server, self._rules):
            logger.warning("opcua: this asyncua has no PostRead callback: anonymous sessions read UserExecutable "
                           "true on the methods they are refused")
        if not _user_executable_in_subscriptions(server.iserver, self._rules):
            logger.warning("opcua: this asyncua keeps its subscriptions elsewhere: anonymous sessions that "
                           "subscribe to UserExecutable are sent true on the methods they are refused")
        elif not _user_executable_follows_identity(server.iserver):
            logger.warning("opcua: this asyncua activates sessions elsewhere: a session that changes its user "
                           "is not sent its new UserExecutable values")
        server.set_identity_tokens([ua.AnonymousIdentityToken, ua.UserNameIdentityToken] if self.user
                                   else [ua.AnonymousIdentityToken])
        idx = await server.register_namespace(NAMESPACE)
        await self._build(server, idx)
        # asyncua logs a failed start (a port in use) with a whole traceback; start() says it in one line
        quiet = logging.getLogger("asyncua.server.server")
        silence = _DropAll()
        quiet.addFilter(silence)
        try:
            await server.start()
        finally:
            quiet.removeFilter(silence)
        binary = getattr(server, "bserver", None)
        if type(getattr(binary, "clients", None)) is list and not binary.clients:
            # asyncua counts each connection against max_connections before it joins this list, so
            # the one past MAX_CONNECTIONS must reach _Connections, which closes one to stay at the cap
            binary.clients = self._connections = _Connections()
            server.iserver.max_connections = MAX_CONNECTIONS + 1
        sockets = getattr(getattr(server.bserver, "_server", None), "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self.port
        self.url = f"opc.tcp://{self.host}:{port}/mrkd/"

    async def _build(self, server, idx: int) -> None:
        from asyncua import ua
        string = ua.NodeId(ua.ObjectIds.String)

        def arg(name, description, data_type=string):
            return ua.Argument(Name=name, DataType=data_type, ValueRank=-1, ArrayDimensions=[],
                               Description=ua.LocalizedText(description))

        vs = await server.nodes.objects.add_object(idx, "VisionSystem")
        machine = await vs.add_object(idx, "VisionStateMachine")
        state, mode = self._shown()
        self._nodes["state"] = await machine.add_variable(idx, "CurrentState", ua.LocalizedText(state))
        self._nodes["mode"] = await machine.add_variable(idx, "AutomaticModeState", ua.LocalizedText(mode))
        job_args = [arg(n, f"{n} (String; the spec's {n}DataType)") for n in JOB_INPUTS]
        job_out = [arg("JobId", "the id the ResultReady event of this job carries")]
        for name, call, inputs, outputs in [
                ("SelectModeAutomatic", self._select_automatic, [], []), ("Halt", self._halt, [], []),
                ("Reset", self._reset, [], []), ("StartSingleJob", self._start_single, job_args, job_out),
                ("StartContinuous", self._start_continuous, job_args, job_out), ("Stop", self._stop, [], []),
                ("Abort", self._abort, [], [])]:
            await machine.add_method(idx, name, self._guarded(name, call, machine.nodeid, (ID,) * len(inputs)),
                                     inputs, outputs)
        # Where the nodeset (VisionStateMachineType) puts them, beside the nodes above: each state machine's
        # state as FiniteStateMachineType's 0:CurrentState, and the automatic mode's methods on its
        # AutomaticModeStateMachine with the nodeset's argument lists and Error output, running the same code
        current_state = ua.QualifiedName("CurrentState", 0)      # its node id a new one in mrkd's namespace
        self._nodes["state 0"] = await machine.add_variable(ua.NodeId(0, idx), current_state, ua.LocalizedText(state))
        automatic = await machine.add_object(idx, "AutomaticModeStateMachine")
        self._nodes["mode 0"] = await automatic.add_variable(ua.NodeId(0, idx), current_state, ua.LocalizedText(mode))
        int32 = ua.NodeId(ua.ObjectIds.Int32)
        error = [arg("Error", "0 (a refused call answers its Bad status code, no outputs)", int32)]
        parameters = ua.Argument(Name="Parameters", DataType=ua.NodeId(ua.ObjectIds.BaseDataType), ValueRank=1,
                                 ArrayDimensions=[], Description=ua.LocalizedText("accepted, not used"))
        cause = [arg("Cause", "accepted, not used", int32), arg("CauseDescription", "accepted, not used")]
        for name, call, inputs, kinds, outputs in [
                ("StartSingleJob", self._start_single, job_args + [parameters], SPEC_JOB, job_out + error),
                ("StartContinuous", self._start_continuous, job_args + [parameters], SPEC_JOB, job_out + error),
                ("Stop", self._stop, cause, SPEC_CAUSE, error), ("Abort", self._abort, cause, SPEC_CAUSE, error)]:
            await automatic.add_method(idx, name, self._guarded(name, call, automatic.nodeid, kinds, error=True),
                                       inputs, outputs)
        recipes = await vs.add_object(idx, "RecipeManagement")
        self._nodes["recipes"] = await recipes.add_variable(
            idx, "Recipes", ua.Variant([str(r) for r in self.target.recipes], ua.VariantType.String))
        self._nodes["prepared"] = await recipes.add_variable(idx, "PreparedRecipe", str(self.recipe))
        for name, call, outputs in [
                ("PrepareRecipe", self._prepare_recipe, [arg("IsCompleted", "true", ua.NodeId(ua.ObjectIds.Boolean))]),
                ("UnprepareRecipe", self._unprepare_recipe, []), ("AddRecipe", self._add_recipe, [])]:
            await recipes.add_method(idx, name, self._guarded(name, call, recipes.nodeid, (ID,)),
                                     [arg("ExternalId", "recipe number")], outputs)
        results = await vs.add_object(idx, "ResultManagement")
        last = await results.add_object(idx, "LastResult")
        for name, value in [("ResultId", ""), ("JobId", ""), ("PartId", ""), ("ResultState", ua.Variant(0, ua.VariantType.Int32)),
                            ("Verdict", ""), ("Score", math.nan), ("Threshold", math.nan),
                            ("CameraNames", ua.Variant([], ua.VariantType.String)),
                            ("CameraScores", ua.Variant([], ua.VariantType.Double)),
                            ("ProcessingTimeMs", 0.0), ("ResultContent", ""),
                            ("PartsJudged", ua.Variant(0, ua.VariantType.UInt32)),
                            ("PartsNG", ua.Variant(0, ua.VariantType.UInt32))]:
            self._nodes[name] = await last.add_variable(idx, name, value)
        await self._build_result_methods(server, idx, results)
        event_type = await server.create_custom_event_type(idx, "ResultReadyEventType", ua.ObjectIds.BaseEventType, [
            ("ResultId", ua.VariantType.String), ("JobId", ua.VariantType.String),
            ("IsPartial", ua.VariantType.Boolean), ("ResultState", ua.VariantType.Int32),
            ("PartId", ua.VariantType.String), ("MeasId", ua.VariantType.String),
            ("RecipeId", ua.VariantType.String), ("ResultContent", ua.VariantType.String),
            # the nodeset's (mandatory but for ExternalRecipeId), beside mrkd's RecipeId
            ("CreationTime", ua.VariantType.DateTime), ("InternalConfigurationId", ua.VariantType.String),
            ("ExternalRecipeId", ua.VariantType.String), ("InternalRecipeId", ua.VariantType.String)])
        self._events = await server.get_event_generator(event_type, vs)
        # the Server object is the root of the notifier hierarchy (OPC 10000-9 6.2) and the events of the
        # server are available through it (OPC 10000-3 4.7.1): MES and SCADA connectors subscribe there
        await server.nodes.server.add_reference(vs.nodeid, ua.ObjectIds.HasNotifier)
        self._ng = 0

    async def _build_result_methods(self, server, idx: int, results) -> None:
        """ResultManagement's GetResultById, GetResultListFiltered and ReleaseResultHandle with the nodeset's
        argument lists and types (runtime/plc/opcua_results.py); anyone who may read may call them."""
        from asyncua import ua
        types = self._result_types = await build_result_types(server, idx)

        def arg(name, data_type, description, array=False):
            return ua.Argument(Name=name, DataType=data_type, ValueRank=1 if array else -1, ArrayDimensions=[],
                               Description=ua.LocalizedText(description))
        int32, uint32 = ua.NodeId(ua.ObjectIds.Int32), ua.NodeId(ua.ObjectIds.UInt32)
        timeout = arg("Timeout", int32, "accepted, not used (the results stay held until pushed out)")
        handle = arg("ResultHandle", types["Handle"], "unique; holds nothing (ReleaseResultHandle is optional)")
        error = arg("Error", int32, "0 (a refused call answers its Bad status code, no outputs)")
        filters = [arg("ResultState", types["ResultStateDataType"], "0: any; 1 completed, 4 failed")] + [
            arg(name, types[data_type], "empty or null: any") for name, data_type in ID_FILTERS] + [
            arg("MaxResults", uint32, f"0: no limit; at most {MAX_LIST_RESULTS} a call"),
            arg("StartIndex", uint32, "position in the list, newest result first"), timeout]
        list_out = [arg("IsComplete", ua.NodeId(ua.ObjectIds.Boolean), "no matching result past this page"),
                    arg("ResultCount", uint32, "results in ResultList"), handle,
                    arg("ResultList", types["ResultDataType"], "newest first", array=True), error]
        methods = []
        by_id = [arg("ResultId", types["ResultIdDataType"], "a held result's"), timeout]
        for name, call, inputs, kinds, outputs in [
                ("GetResultById", self._get_result_by_id, by_id, GET_RESULT,
                 [handle, arg("Result", types["ResultDataType"], "the result"), error]),
                ("GetResultListFiltered", self._get_result_list, filters, GET_RESULT_LIST, list_out),
                ("ReleaseResultHandle", self._release_result_handle, [handle], (COUNT,), [error])]:
            methods.append(await results.add_method(idx, name, self._guarded(name, call, results.nodeid, kinds,
                                                                              error=True), inputs, outputs))
        self._rules.anyone_may_call = {m.nodeid for m in methods}

    def reload_certificate(self, reason: str = "request") -> bool:
        """Load the server's certificate and key again (`mrkd run` does it on SIGHUP): new secure channels
        and GetEndpoints present the new one, open channels keep theirs. False (the old pair stays, the
        reason logged in one line) when the pair does not load, does not match, or names another
        application URI (clients know the server by it: that needs a restart)."""
        if not self.certificate or self._loop is None or self._closed:
            return False
        try:
            asyncio.run_coroutine_threadsafe(self._reload_certificate(), self._loop).result(30)
        except PlcError as exc:
            logger.warning("opcua: certificate reload (%s) REFUSED, the previous one stays: %s", reason, exc)
            return False
        logger.warning("opcua: certificate reloaded (%s) from %s", reason, self.certificate)
        return True

    async def _reload_certificate(self) -> None:
        # asyncua reads the certificate at start into three places: the internal server (sessions),
        # each endpoint description (GetEndpoints) and each security policy factory (new channels)
        from asyncua.crypto import uacrypto
        try:
            certificate = await uacrypto.load_certificate(self.certificate)
            private_key = await uacrypto.load_private_key(self.private_key)
        except Exception as exc:      # asyncua/cryptography raise ValueError, OSError, TypeError, ...
            raise PlcError(f"--opcua-certificate {self.certificate} / --opcua-private-key {self.private_key}: "
                           f"cannot load them ({exc})") from None
        if certificate.public_key().public_numbers() != private_key.public_key().public_numbers():
            raise PlcError(f"--opcua-private-key {self.private_key} is not the key of {self.certificate}")
        uri = _certificate_uri(self.certificate)
        if uri != self._server.get_application_uri():
            raise PlcError(f"{self.certificate} names application URI {uri}, the running server "
                           f"{self._server.get_application_uri()}; restart the line for a new URI")
        iserver = self._server.iserver
        endpoints, factories = getattr(iserver, "endpoints", None), getattr(self._server, "_policies", None)
        if endpoints is None or factories is None:       # asyncua's internals moved: say so, change nothing
            raise PlcError("this asyncua keeps its certificate elsewhere; restart the line to serve the new one")
        der = uacrypto.der_from_x509(certificate)
        iserver.certificate, iserver.private_key = certificate, private_key
        for endpoint in endpoints:
            if endpoint.ServerCertificate:
                endpoint.ServerCertificate = der
        for factory in factories:
            if factory.certificate is not None:
                factory.certificate, factory.private_key = certificate, private_key

    def close(self) -> None:
        if self._closed or self._loop is None:
            return
        self._closed = True
        loop = self._loop
        if self._server is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._server.stop(), loop).result(10)
            except Exception:   # closing must not raise at the end of a run
                logger.exception("opcua: stop")
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # ------------------------------------------------------------ the state machine
    async def _set_state(self, state: Optional[str] = None, mode: Optional[str] = None) -> None:
        """Change the state machine's own state and/or mode (out of Operational it holds the line
        offline), then write what clients read (``_shown``)."""
        from asyncua import ua
        if state is not None:
            self.state = state
            if state == "Operational":
                self.offline.release(OfflineHolder.OPCUA)
            else:
                self.offline.hold(OfflineHolder.OPCUA, state)
        if mode is not None:
            self.mode = mode
        shown_state, shown_mode = self._shown()
        for name, value in (("state", shown_state), ("state 0", shown_state), ("mode", shown_mode),
                            ("mode 0", shown_mode)):
            await self._nodes[name].write_value(ua.LocalizedText(value))

    def _shown(self) -> Tuple[str, str]:
        """CurrentState and AutomaticModeState as clients read them: while another interface holds the
        line offline an Operational system is Preoperational (entered and left by automatic
        transitions), so it never looks ready for a job the line would refuse."""
        if self.state == "Operational" and self.offline.held_by_another(OfflineHolder.OPCUA):
            return "Preoperational", ""
        return self.state, self.mode

    def _line_offline_changed(self) -> None:
        # called on the thread that changed the holders (a Modbus write's, or ours)
        if self._loop is not None and not self._closed:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._follow_line()))

    async def _follow_line(self) -> None:
        if self._server is None:
            return
        if self._shown()[0] != self.state:     # another interface took the line: no job runs on
            await self._end_continuous()
            self.mode = "Ready"                # what its release comes back to
        await self._set_state()

    def _guarded(self, name: str, call, owner, inputs: Tuple[str, ...], error: bool = False):
        """``call`` as asyncua runs it, after the checks every method shares: called on the object it
        belongs to (else BadMethodInvalid), with arguments of the ``inputs`` kinds (_arguments); ``call``
        gets the ID ones as str. ``error``: the nodeset's Error output (Int32 0) follows its outputs when it
        succeeds. An exception in it answers BadInternalError with one log line, where asyncua logged a
        traceback and the arguments (however long) and answered BadUnexpectedError."""
        from asyncua import ua

        async def method(parent, *args):
            if parent != owner:
                return self._status("BadMethodInvalid")
            checked = self._arguments(args, inputs)
            if not isinstance(checked, list):
                return checked
            try:
                done = await call(parent, *checked)
            except Exception as exc:
                logger.warning("opcua: %s failed: %s: %s", name, type(exc).__name__, exc)
                return self._status("BadInternalError")
            return done + [ua.Variant(0, ua.VariantType.Int32)] if error and isinstance(done, list) else done
        return method

    @staticmethod
    def _status(code):
        from asyncua import ua
        return ua.StatusCode(getattr(ua.StatusCodes, code))

    async def _select_automatic(self, parent):
        if self.state not in ("Preoperational", "Operational") or self.offline.held_by_another(OfflineHolder.OPCUA):
            return self._status("BadInvalidState")        # the line would stay offline: not Operational
        await self._set_state("Operational", "Ready")
        return []

    async def _halt(self, parent):
        await self._end_continuous()
        await self._set_state("Halted", "")
        return []

    async def _reset(self, parent):
        # OPC 40100-1 8.2.2.2: Reset "shall always be executable" (back to the state after power-up), so
        # from Operational too (OperationalToPreoperational): a continuous run ends, the line goes offline
        # until SelectModeAutomatic; parts already triggered are still judged and reported.
        await self._end_continuous()
        await self._set_state("Preoperational", "")
        return []

    async def _start_single(self, parent, *values: str):
        checked = self._job_arguments(values)
        if not isinstance(checked, dict):
            return checked
        if self._shown() != ("Operational", "Ready"):
            return self._status("BadInvalidState")
        job = self._trigger(checked)
        if job is None:
            return self._status("BadInvalidState")      # the line refused (counted as a missed trigger)
        self._single_job = job      # before any await: its result may come on this loop's next turn
        await self._set_state(mode="SingleExecution")
        return [_string(job)]

    async def _start_continuous(self, parent, *values: str):
        checked = self._job_arguments(values)
        if not isinstance(checked, dict):
            return checked
        if self._shown() != ("Operational", "Ready"):
            return self._status("BadInvalidState")
        self.jobs += 1
        job = f"{self.target.run_id}-continuous-{self.jobs}"
        # the run's recipe is fixed at its start (its RecipeId, else the prepared one): every part of it
        # is judged alike, whatever the recipe management does while it runs
        checked = dict(checked, RecipeId=checked["RecipeId"].strip() or str(self.recipe))
        await self._set_state(mode="ContinuousExecution")
        self._continuous = asyncio.ensure_future(self._run_continuous(job, checked))
        return [_string(job)]

    async def _run_continuous(self, job: str, checked: dict) -> None:
        count = 0
        while self.mode == "ContinuousExecution":
            if self.target.ready:
                count += 1
                self._trigger(dict(checked, PartId=f"{checked['PartId'] or job}-{count}"), job=job)
            await asyncio.sleep(0.002)

    async def _end_continuous(self) -> None:
        task, self._continuous = self._continuous, None
        if task is not None:
            task.cancel()

    async def _stop(self, parent):
        if self.mode != "ContinuousExecution":
            return self._status("BadInvalidState")
        await self._set_state(mode="Ready")
        await self._end_continuous()
        return []

    async def _abort(self, parent):
        if self.mode not in ("SingleExecution", "ContinuousExecution"):
            return self._status("BadInvalidState")
        await self._end_continuous()
        await self._set_state(mode="Ready")        # results of parts already triggered still arrive
        return []

    async def _prepare_recipe(self, parent, external_id: str):
        recipe = self._recipe(external_id)
        if recipe is None:
            return self._status("BadInvalidArgument")
        if self._shown()[1] not in ("Ready", "Initialized"):
            return self._status("BadInvalidState")
        self.recipe = recipe
        await self._nodes["prepared"].write_value(str(self.recipe))
        from asyncua import ua
        return [ua.Variant(True, ua.VariantType.Boolean)]

    async def _unprepare_recipe(self, parent, external_id: str):
        # as PrepareRecipe: the prepared recipe only (another id went back to 0 unasked), never while a
        # job runs (a continuous run's later parts changed recipe mid-run)
        if self._recipe(external_id) != self.recipe:
            return self._status("BadInvalidArgument")
        if self._shown()[1] not in ("Ready", "Initialized"):
            return self._status("BadInvalidState")
        self.recipe = 0
        await self._nodes["prepared"].write_value("0")
        return []

    async def _add_recipe(self, parent, external_id: str):
        return self._status("BadNotSupported")       # recipes come from the line file

    def _arguments(self, args, inputs: Tuple[str, ...]):
        """The USED arguments' values (ID, STRUCT_ID: str; NUMBER, COUNT: int), or a CallMethodResult saying
        which arguments are not
        of their kind (BadTypeMismatch), or of the ID ones, which are longer than MAX_ARGUMENT_CHARS
        (BadOutOfRange) or hold control characters (BadInvalidArgument: an id travels into every log line
        of its part; trigger.has_control_characters); STRUCT_ID ones alike."""
        from asyncua import ua
        if len(args) != len(inputs):
            return self._status("BadArgumentsMissing" if len(args) < len(inputs) else "BadTooManyArguments")

        def string(v):
            return v.VariantType == ua.VariantType.String and not v.is_array and isinstance(v.Value, str)

        def check(v, kind):
            if kind in (INT32, NUMBER):
                ok = v.VariantType == ua.VariantType.Int32 and not v.is_array and v.Value is not None
            elif kind == COUNT:
                ok = v.VariantType == ua.VariantType.UInt32 and not v.is_array and v.Value is not None
            elif kind == STRUCT_ID:
                ok = not v.is_array and _id_text(v) is not None
            elif kind == ARRAY:
                ok = v.is_array or v.VariantType == ua.VariantType.Null
            else:
                ok = string(v)
            if not ok:
                return ua.StatusCodes.BadTypeMismatch
            text = v.Value if kind == ID else _id_text(v) if kind == STRUCT_ID else None
            if text is not None and len(text) > MAX_ARGUMENT_CHARS:
                return ua.StatusCodes.BadOutOfRange
            if text is not None and has_control_characters(text):
                return ua.StatusCodes.BadInvalidArgument
            return ua.StatusCodes.Good

        results = [ua.StatusCode(check(v, kind)) for v, kind in zip(args, inputs)]
        if any(not r.is_good() for r in results):
            return ua.CallMethodResult(StatusCode=ua.StatusCode(ua.StatusCodes.BadInvalidArgument),
                                       InputArgumentResults=results)
        return [_id_text(v) if kind == STRUCT_ID else v.Value for v, kind in zip(args, inputs) if kind in USED]

    # ------------------------------------------------------------ result retrieval (opcua_results.py)
    def _handle(self):
        from asyncua import ua
        self._handles = self._handles % 0xFFFFFFFF + 1
        return ua.Variant(self._handles, ua.VariantType.UInt32)

    async def _get_result_by_id(self, parent, result_id: str):
        from asyncua import ua
        held = self.history.by_id(result_id.strip())
        if held is None:
            return self._status("BadNotFound")     # never given this run, or pushed out of the history
        return [self._handle(), ua.Variant(held.result, ua.VariantType.ExtensionObject)]

    async def _get_result_list(self, parent, result_state: int, *values):
        from asyncua import ua
        *ids, max_results, start = values
        wanted = {name: text.strip() for (name, _), text in zip(ID_FILTERS, ids)}
        count = min(max_results or MAX_LIST_RESULTS, MAX_LIST_RESULTS)
        matching = self.history.newest_first(result_state, wanted)
        page = [held.result for _, held in zip(range(start + count), matching)][start:]
        complete = next(matching, None) is None
        return [ua.Variant(complete, ua.VariantType.Boolean), ua.Variant(len(page), ua.VariantType.UInt32),
                self._handle(), ua.Variant(page, ua.VariantType.ExtensionObject)]

    async def _release_result_handle(self, parent, handle: int):
        # a handle holds nothing here: one this server handed out is released at once
        if not 0 < handle <= self._handles:
            return self._status("BadInvalidArgument")
        return []

    def _job_arguments(self, values):
        """A job's inputs (already _arguments-checked) by name, or BadInvalidArgument for an unknown recipe."""
        checked = dict(zip(JOB_INPUTS, values))
        if checked["RecipeId"].strip() and self._recipe(checked["RecipeId"]) is None:
            return self._status("BadInvalidArgument")
        return checked

    def _recipe(self, text: str) -> Optional[int]:
        """A recipe number of the line's, from its decimal text; None otherwise (ASCII digits only:
        str.isdigit also passes '²', which int() refuses, and int() refuses over 4300 digits)."""
        text = text.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= MAX_RECIPE_DIGITS):
            return None
        return int(text) if int(text) in self.target.recipes else None

    def _trigger(self, checked: dict, job: Optional[str] = None) -> Optional[str]:
        """Trigger one part; records its job before returning to the event loop, so the result
        (published on this loop) always finds it."""
        if job is None:
            self.jobs += 1
            job = f"{self.target.run_id}-{self.jobs}"      # unique across restarts, as ResultIds
        recipe = self._recipe(checked["RecipeId"]) if checked["RecipeId"].strip() else self.recipe
        part_id = checked["PartId"] or f"job-{self.jobs}"
        receipt = self.target.trigger(part_id, recipe)
        if not receipt.accepted:
            return None
        self._jobs.setdefault((receipt.part_id, receipt.time), deque()).append(
            (job, checked["MeasId"], checked["ProductId"]))
        return job

    # ------------------------------------------------------------ results
    def on_part(self, result: PartResult) -> None:
        if self._loop is not None and not self._closed:
            with self._publishing_lock:
                self._publishing += 1
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._publish_counted(result)))

    async def _publish_counted(self, part: PartResult) -> None:
        try:
            await self._publish(part)
        finally:
            with self._publishing_lock:
                self._publishing -= 1

    def on_trigger(self, receipt: TriggerReceipt) -> None:
        pass

    async def _publish(self, part: PartResult) -> None:
        from asyncua import ua
        key = (part.part_id, part.trigger_time)
        waiting = self._jobs.get(key)
        job, meas, product = waiting.popleft() if waiting else ("", "", "")
        if waiting is not None and not waiting:
            del self._jobs[key]
        self.results += 1
        self._ng += part.verdict == Verdict.NG
        state = RESULT_FAILED if part.verdict == Verdict.ERROR else RESULT_COMPLETED
        content = json.dumps(result_content(part))
        values = {"ResultId": part.result_id, "JobId": job, "PartId": part.part_id,
                  "ResultState": ua.Variant(state, ua.VariantType.Int32), "Verdict": part.verdict,
                  "Score": float(part.score), "Threshold": float(part.threshold),
                  "CameraNames": ua.Variant([c.camera for c in part.cameras], ua.VariantType.String),
                  "CameraScores": ua.Variant([float(c.score) for c in part.cameras], ua.VariantType.Double),
                  "ProcessingTimeMs": part.verdict_s * 1000.0, "ResultContent": content,
                  "PartsJudged": ua.Variant(self.results, ua.VariantType.UInt32),
                  "PartsNG": ua.Variant(self._ng, ua.VariantType.UInt32)}
        # Ready before the event (a client may start the next job on it), with the variables in one
        # write request (a Read of them all never mixes two parts), then the event: one write, no
        # await between the verdict's arrival on this loop and the event but that one.
        # Only the running single job's own result ends it: one aborted (or halted) before it still
        # reports, but the job started after it is not done.
        if self.mode == "SingleExecution" and job and job == self._single_job:
            self._single_job = None
            self.mode = "Ready"
            values["mode"] = values["mode 0"] = ua.LocalizedText(self._shown()[1])
        await self._write_all(values)
        self.history.add(result_data(self._result_types, part, job, meas, product, state, content))
        event = self._events.event
        event.ResultId, event.JobId, event.IsPartial, event.ResultState = part.result_id, job, False, state
        event.PartId, event.MeasId, event.RecipeId, event.ResultContent = part.part_id, meas, str(part.recipe), content
        # the recipe is the line file's number, whoever names it; the configuration that made the result is
        # the model that judged it (a hot swap or a refit changes it, the recipe number stays)
        event.ExternalRecipeId = event.InternalRecipeId = str(part.recipe)
        event.InternalConfigurationId = part.model_sha256
        event.CreationTime = datetime.fromtimestamp(part.trigger_time + part.verdict_s, timezone.utc)
        event.Severity = 100 if part.verdict == Verdict.OK else 500
        await self._events.trigger(message=f"part {part.part_id}: {part.verdict}")
        await self._notify_server_object(event)

    async def _notify_server_object(self, event) -> None:
        """The event just emitted by VisionSystem, the same one (its EventId, SourceNode VisionSystem), to
        the monitored items of the Server object too: asyncua hands an event only to the items on the node
        that emitted it."""
        from asyncua import ua
        at_server = copy.copy(event)         # another part's event may fill the shared one meanwhile
        at_server.emitting_node = ua.NodeId(ua.ObjectIds.Server)
        await self._events.isession.subscription_service.trigger_event(at_server)

    async def _write_all(self, values: dict) -> None:
        from asyncua import ua
        nodes = []
        for name, value in values.items():
            variant = value if isinstance(value, ua.Variant) else ua.Variant(value)
            nodes.append(ua.WriteValue(NodeId=self._nodes[name].nodeid, AttributeId=ua.AttributeIds.Value,
                                       Value=ua.DataValue(variant)))
        results = await self._server.iserver.isession.write(ua.WriteParameters(NodesToWrite=nodes))
        for name, status in zip(values, results):
            if not status.is_good():
                logger.warning("opcua: LastResult/%s not written: %s", name, status)

    def on_stop(self) -> None:
        # a job's ResultReady is owed until its event has left the subscriptions' queues for the wire
        if self._linger(lambda: bool(self._publishing) or self._events_queued()):
            logger.warning("opcua: run ended with ResultReady events not delivered within %g s",
                           self.RESULTS_LINGER_S)
        self.close()

    def _events_queued(self) -> bool:
        """Whether a client's subscription still holds an event for its next Publish response. (asyncua
        2.x's InternalSubscription keeps them in ``_triggered_events``; where that is gone, no linger.)"""
        service = getattr(getattr(self._server, "iserver", None), "subscription_service", None)
        subscriptions = list(getattr(service, "subscriptions", {}).values())
        return any(getattr(subscription, "_triggered_events", None) for subscription in subscriptions)

    def health(self) -> Optional[OutputHealth]:
        # stopped with the run is not a failure
        connections = self._connections
        return OutputHealth(name="opcua", ok=True, state="stopped" if self._closed else "listening",
                            sent=self.results, detail=(self.url or f"opc.tcp://{self.host}:{self.port}")
                            # connections the server closed on its own: said, never silent
                            + (f", {connections.made_room} without a session closed to make room"
                               if connections is not None and connections.made_room else "")
                            + (f", {connections.refused} refused: every place held by an activated session"
                               if connections is not None and connections.refused else ""))


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


# What asyncua and asyncio log, as ERROR or WARNING, about a client that vanished without closing its
# session (killed, unplugged): normal on a line, and the job's own answer already went out or was lost
# with the client. (logger, start of the message)
VANISHED_CLIENT_NOISE = (("asyncua.server.uaprocessor", "sending service fault response"),
                         ("asyncua.server.internal_subscription", "Subscription"),
                         ("asyncio", "socket.send() raised exception"))


class _VanishedClient(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


ROOM_MADE = "opcua: closed the connection from %s, the oldest without an activated session, to stay at %d"
ROOM_REFUSED = "opcua: refused a connection from %s: all %d connections have activated sessions"
# The warning per connection refused or closed past MAX_CONNECTIONS (asyncua's own when _Connections is
# not in place) or closed unactivated: a flood would write one line per socket on the line's stderr, so
# each is said once per client address. (logger, starts of its messages)
CROWDED_NOISE = (("asyncua.server.binary_server_asyncio", ("Refusing connection from", "Closing idle connection from")),
                 (__name__, (ROOM_MADE, ROOM_REFUSED)))


class _OncePerAddress(logging.Filter):
    REMEMBERED = 1024       # addresses kept; past that a warning may be said again

    def __init__(self, starts):
        super().__init__()
        self.starts = tuple(starts)
        self.said = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(self.starts):
            return True
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
        key = (record.msg, peer[0] if isinstance(peer, tuple) and peer else peer)
        if key in self.said:
            return False
        if len(self.said) >= self.REMEMBERED:
            self.said.clear()
        self.said.add(key)
        return True


class _Connections(list):
    """asyncua's list of a server's open connections (BinaryServer.clients), which each new one joins
    in its connection_made. Past MAX_CONNECTIONS the oldest connection without an activated session is
    closed to make room (sockets that never speak held every place until ACTIVATION_DEADLINE_S, and a
    PLC connecting meanwhile was refused); one with an activated session never is: when all are, the
    new connection is refused. A connection that leaves (its connection_lost) takes its queued Publish
    requests with it (_forget_publish_requests)."""

    made_room = 0       # connections without an activated session closed for a newer one
    refused = 0         # new connections closed because every place held an activated session

    def remove(self, connection) -> None:
        super().remove(connection)
        _forget_publish_requests(connection)

    def append(self, connection) -> None:
        super().append(connection)
        if len(self) <= MAX_CONNECTIONS:
            return
        waiting = next((c for c in self if c is not connection and not _activated(c)), None)
        closed = waiting if waiting is not None else connection
        if waiting is not None:
            self.made_room += 1
        else:
            self.refused += 1
        # out of the count at once: its connection_lost (which removes it too) may come after the
        # next connection has been counted
        self.remove(closed)
        closed.transport.close()
        peer = closed.peer_name[0] if isinstance(closed.peer_name, tuple) else closed.peer_name   # the address
        logger.warning(ROOM_MADE if waiting is not None else ROOM_REFUSED, peer, MAX_CONNECTIONS)


def _forget_publish_requests(connection) -> None:
    """Drop the Publish requests a closed connection had queued. A session with subscriptions outlives
    its connection (the client reactivates it on a new channel), and asyncua kept answering the old
    channel's queued requests: the ResultReady events of parts judged while the client was away went
    into the closed socket, recoverable only by Republish, which node-opcua asks from the sequence
    number after the last keep-alive's, past them. Without those requests the events wait in the
    subscription for the new channel's first Publish."""
    requests = getattr(getattr(connection, "processor", None), "_publish_requests", None)
    if requests is not None:
        requests.clear()


def _activated(connection) -> bool:
    session = getattr(getattr(connection, "processor", None), "session", None)
    return session is not None and session.is_activated()


def _quiet_vanished_clients() -> None:
    for name, start in VANISHED_CLIENT_NOISE:
        target = logging.getLogger(name)
        if not any(isinstance(f, _VanishedClient) and f.start == start for f in target.filters):
            target.addFilter(_VanishedClient(start))
    for name, starts in CROWDED_NOISE:
        target = logging.getLogger(name)
        if not any(isinstance(f, _OncePerAddress) for f in target.filters):
            target.addFilter(_OncePerAddress(starts))


def result_content(part: PartResult) -> dict:
    """What ResultContent carries (JSON): the verdict and the numbers behind it."""
    def number(x):
        return None if not math.isfinite(x) else float(x)
    return {"verdict": part.verdict, "ok": part.verdict == Verdict.OK, "score": number(part.score),
            "threshold": number(part.threshold), "inspection_id": part.inspection_id, "run_id": part.run_id,
            "part_id": part.part_id, "recipe": part.recipe, "processing_ms": round(part.verdict_s * 1000.0, 3),
            "cameras": [{"camera": c.camera, "score": number(c.score), "threshold": number(c.threshold),
                         "ng": c.anomalous, "error": c.error} for c in part.cameras],
            "error_code": part.error_code, "error": part.error, "model_sha256": part.model_sha256}


def _build_date() -> datetime:
    """BuildInfo's BuildDate: when this mrkd was installed (its package's time), in UTC."""
    return datetime.fromtimestamp(os.path.getmtime(mrkd.__file__), timezone.utc)


def _certificate_uri(path: str) -> str:
    """The application URI in a certificate's subject alternative names (PEM or DER)."""
    from cryptography import x509
    data = open(path, "rb").read()
    try:
        cert = x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") \
            else x509.load_der_x509_certificate(data)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return names.get_values_for_type(x509.UniformResourceIdentifier)[0]
    except (ValueError, IndexError, x509.ExtensionNotFound) as exc:
        raise PlcError(f"OPC UA certificate {path}: no application URI in its subject alternative names "
                       f"({exc})") from None


class _Validator:
    """asyncua's certificate validator (at CreateSession): the presented certificate must be admitted by
    the trust folder (runtime/plc/trust.py)."""

    def __init__(self, trust):
        self.trust = trust

    async def validate(self, cert, app_description) -> None:
        from asyncua import ua
        from asyncua.common.utils import ServiceError
        from cryptography.hazmat.primitives.serialization import Encoding
        der = cert.public_bytes(Encoding.DER)
        refusal = self.trust.refusal(der)
        if refusal is not None:
            logger.warning("opcua: client certificate %s (%s) refused: %s", cert.subject.rfc4514_string(),
                           getattr(app_description, "ApplicationUri", "?"), refusal_said(self.trust, der, refusal))
            raise ServiceError(getattr(ua.StatusCodes, refusal))


def _id_text(v) -> Optional[str]:
    """The text of an id argument: a String, one of the nodeset's id structures (its Id; asyncua decodes
    those it built), or null (""); None for anything else."""
    from asyncua import ua
    if v.VariantType == ua.VariantType.Null:
        return ""
    if v.VariantType == ua.VariantType.ExtensionObject and (
            v.Value is None or isinstance(v.Value, ua.ExtensionObject) and v.Value.TypeId.is_null()):
        return ""                             # a null structure
    if v.VariantType == ua.VariantType.String:
        return v.Value if isinstance(v.Value, str) else ""
    if v.VariantType == ua.VariantType.ExtensionObject:
        if not hasattr(v.Value, "Id"):
            return None                   # a structure of another type
        text = v.Value.Id
        return "" if text is None else text if isinstance(text, str) else None
    return None


def _string(text: str):
    from asyncua import ua
    return ua.Variant(text, ua.VariantType.String)


class _Rules:
    """Anonymous sessions browse, read and subscribe, and call the methods that read results
    (``anyone_may_call``); other method calls (and writes) need the user unless anonymous calls are
    allowed. Built on asyncua's own request lists."""

    anyone_may_call: frozenset = frozenset()      # method node ids (ResultManagement's, set by _build)

    def __init__(self, anonymous_calls: bool):
        from asyncua import ua
        from asyncua.crypto.permission_rules import USER_TYPES, UserRole
        user = {ua.NodeId(t) for t in USER_TYPES} - {ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary)}
        anonymous = set(user)
        if not anonymous_calls:
            anonymous.discard(ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary))
        self._allowed = {UserRole.User: user, UserRole.Anonymous: anonymous, UserRole.Admin: user}
        self._call = ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary)

    @staticmethod
    def _role(user):
        from asyncua.crypto.permission_rules import UserRole
        return user.role if user is not None else UserRole.Anonymous

    def check_validity(self, user, action_type, body) -> bool:
        from asyncua.crypto.permission_rules import UserRole
        role = self._role(user)
        if action_type in self._allowed.get(role, set()):
            return True
        return action_type == self._call and role == UserRole.Anonymous and self._reads_only(body)

    def may_call(self, user, method_id) -> bool:
        """Whether ``user``'s session may call the method ``method_id`` (as check_validity decides)."""
        return self._call in self._allowed.get(self._role(user), set()) or method_id in self.anyone_may_call

    def user_value(self, user, node_id, attribute, value):
        """The DataValue ``value`` of ``attribute`` of ``node_id`` as ``user``'s session is told it: a
        method's UserExecutable is false where that session may not call it; anything else as it is."""
        from asyncua import ua
        if (attribute == ua.AttributeIds.UserExecutable and value is not None and value.Value is not None
                and value.Value.Value is True and not self.may_call(user, node_id)):
            return dataclasses.replace(value, Value=ua.Variant(False, ua.VariantType.Boolean))
        return value

    def lower_user_executable(self, read, _callbacks=None) -> None:
        """asyncua's PostRead listener (``read``: its ServerItemCallback): a session reading UserExecutable
        of a method it may not call is answered false; the node's own value (true) stays for the others."""
        answers = read.response_params
        for i, (item, answer) in enumerate(zip(read.request_params.NodesToRead, answers)):
            answers[i] = self.user_value(read.user, item.NodeId, item.AttributeId, answer)

    def _reads_only(self, body) -> bool:
        """Whether a CallRequest calls only methods anyone may call (its body is read from a copy)."""
        from asyncua import ua
        from asyncua.ua.ua_binary import struct_from_binary
        try:
            calls = struct_from_binary(ua.CallParameters, body.copy()).MethodsToCall or []
        except Exception:     # a request that does not decode is refused by the check, then by asyncua
            return False
        return bool(calls) and all(call.MethodId in self.anyone_may_call for call in calls)


def _user_executable_per_session(server, rules: _Rules) -> bool:
    """Make a Read of a method's UserExecutable say whether the reading session may call it (OPC 10000-3:
    executable taking the current user into account); asyncua answers every session the node's stored
    value. Written against asyncua 2.1.0, whose PostRead server callback is handed the session's user and
    the very list of DataValues the Read answers (InternalSession.read); tests/test_plc_opcua_access.py
    fails if that changes. False where this asyncua has no such callback."""
    from asyncua.common.callback import CallbackType
    post_read = getattr(CallbackType, "PostRead", None)
    if post_read is None or not hasattr(server, "subscribe_server_callback"):
        return False
    server.subscribe_server_callback(post_read, rules.lower_user_executable)
    return True


def _user_executable_in_subscriptions(iserver, rules: _Rules) -> bool:
    """Make a MonitoredItem on a method's UserExecutable (a HMI subscribing to it rather than reading it)
    send the value a Read of that session gets; asyncua sends every session the node's stored value. Each
    subscription's MonitoredItemService reads the values it sends (an item's first, and again when a
    Disabled item is set to Reporting) and registers its data change callbacks through its ``aspace``:
    here that is the address space as the subscription's session sees it (_SessionAddressSpace), whose
    user is looked up when a value is sent (a subscription moves to another session on
    TransferSubscriptions). Written against asyncua 2.1.0 (SubscriptionService.create_subscription,
    InternalSubscription.monitored_item_srv.aspace, InternalServer._external_sessions);
    tests/test_plc_opcua_access.py fails if that changes. False, changing nothing, where this asyncua
    has none of these."""
    service = getattr(iserver, "subscription_service", None)
    create = getattr(service, "create_subscription", None)
    sessions = getattr(iserver, "_external_sessions", None)
    if create is None or not isinstance(getattr(service, "subscriptions", None), dict) \
            or not isinstance(sessions, dict):
        return False

    def user_of(session_id):
        """The user of the session that owns a subscription now; None (anonymous, told the least) where
        that session has gone (closed without deleting its subscriptions)."""
        return getattr(session_of(iserver, session_id), "user", None)

    async def create_subscription(params, *args, **kwargs):
        result = await create(params, *args, **kwargs)
        subscription = service.subscriptions.get(result.SubscriptionId)
        items = getattr(subscription, "monitored_item_srv", None)
        if items is not None and getattr(items, "aspace", None) is not None:
            items.aspace = _SessionAddressSpace(
                items.aspace, lambda node_id, attribute, value: rules.user_value(
                    user_of(subscription.session_id), node_id, attribute, value))
        elif not unwrapped:
            unwrapped.append(result.SubscriptionId)
            logger.warning("opcua: this asyncua's subscriptions read the address space elsewhere: anonymous "
                           "sessions that subscribe to UserExecutable are sent true on the methods they are refused")
        return result

    unwrapped: list = []      # said once

    service.create_subscription = create_subscription
    return True


def _user_executable_follows_identity(iserver) -> bool:
    """A session that changes its user (ActivateSession again, with another identity: OPC 10000-4 5.6.3) is
    sent the UserExecutable values of its MonitoredItems anew, as the new user's: they were sent once, as
    the old user's (an operator logging in on a HMI's anonymous session went on being told he may not call
    StartSingleJob). Written against asyncua 2.1.0 (InternalSession.activate_session, each subscription's
    monitored_item_srv and its trigger_datachange, which sends only a changed value). False, changing
    nothing, where this asyncua has none of these."""
    create = getattr(iserver, "create_session", None)
    service = getattr(iserver, "subscription_service", None)
    if create is None or not isinstance(getattr(service, "subscriptions", None), dict):
        return False
    sending: set = set()      # the tasks under way (the loop holds them weakly)

    async def send_again(session) -> None:
        from asyncua import ua
        for subscription in list(service.subscriptions.values()):
            items = getattr(subscription, "monitored_item_srv", None)
            if subscription.session_id != session.session_id or items is None:
                continue
            for handle, mid in list(getattr(items, "_monitored_datachange", {}).items()):
                watched = getattr(items._monitored_items.get(mid), "read_value_id", None)
                if watched is not None and watched.AttributeId == ua.AttributeIds.UserExecutable:
                    await items.trigger_datachange(handle, watched.NodeId, watched.AttributeId)

    def create_session(*args, **kwargs):
        session = create(*args, **kwargs)
        activate = getattr(session, "activate_session", None)
        if getattr(session, "external", False) and activate is not None:
            def activate_session(*a, **k):
                before = getattr(session, "user", None)
                result = activate(*a, **k)
                after = getattr(session, "user", None)
                if before is not None and (getattr(before, "role", None), getattr(before, "name", None)) != \
                        (getattr(after, "role", None), getattr(after, "name", None)):
                    task = asyncio.get_running_loop().create_task(send_again(session))   # after its answer
                    sending.add(task)
                    task.add_done_callback(sending.discard)
                return result
            session.activate_session = activate_session
        return session

    iserver.create_session = create_session
    return True


class _SessionAddressSpace:
    """asyncua's AddressSpace as one subscription's session sees it (_user_executable_in_subscriptions):
    ``told(node_id, attribute, value)`` gives the DataValue that session is sent, for the values the
    subscription reads and for those its data change callbacks are handed; the rest is the address space."""

    def __init__(self, aspace, told):
        self._aspace, self._told = aspace, told

    def __getattr__(self, name):
        return getattr(self._aspace, name)

    def read_attribute_value(self, nodeid, attr):
        return self._told(nodeid, attr, self._aspace.read_attribute_value(nodeid, attr))

    def add_datachange_callback(self, nodeid, attr, callback):
        def told(handle, value, error=None):      # returns what callback returns (asyncua awaits it)
            return callback(handle, value if value is None or error else self._told(nodeid, attr, value), error)
        return self._aspace.add_datachange_callback(nodeid, attr, told)
