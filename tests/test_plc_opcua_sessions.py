"""A subscription belongs to the session that created it: another client must not change, read or take
it. A PLC or HMI holds a user session whose subscription delivers the ResultReady events; a second client
(tests/opcua_client/sessions.js, node-opcua), anonymous, calls each subscription service on the first
one's SubscriptionId and MonitoredItemId (small integers handed out in order, easy to guess). OPC 10000-4
(5.14, 5.13) answers a subscription of another session Bad_SubscriptionIdInvalid, and TransferSubscriptions
Bad_UserAccessDenied where the new session's user is not the old one's (5.14.7). asyncua looked every id up
among all the server's subscriptions: an anonymous client could disable, empty or delete the PLC's
subscription, change its items, acknowledge (drop) its held messages and take it over by transfer."""

from __future__ import annotations

import json
import subprocess

import pytest

pytest.importorskip("asyncua", reason="SKIPPED, NOT TESTED: asyncua missing (pip install 'mrkd[plc]')")

from plc_fixtures import OPCUA_CLIENT_DIR, folder_cell  # noqa: E402
from test_plc_opcua import PASSWORD, USER, node_client_ready  # noqa: E402

from mrkd.runtime.plc.opcua import OpcUaPlc  # noqa: E402

# The victim's own calls on its subscription afterwards (sessions.js's OWN): all work
OWN_GOOD = dict.fromkeys(("ModifySubscription", "ModifyMonitoredItems", "SetMonitoringMode", "SetPublishingMode"),
                         "Good")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """A VisionSystem with the user over a running cell judging good parts; its url."""
    runner = folder_cell(tmp_path_factory.mktemp("sessions"), "g" * 40)
    plc = OpcUaPlc(runner, "opc.tcp://127.0.0.1:0", user=USER, password=PASSWORD).start()
    runner.observers.append(plc)
    runner.start()
    try:
        yield plc.url
    finally:
        runner.stop()
        plc.close()


def attempt(url: str, service: str, who: str = "anonymous") -> dict:
    """sessions.js's answer: ``service`` called by a second client (``who``) on the victim's subscription."""
    done = subprocess.run([node_client_ready(), "sessions.js", url, USER, PASSWORD, service, who],
                          cwd=OPCUA_CLIENT_DIR, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"kind":"attempt"')]
    assert len(lines) == 1, done.stdout[-2000:]
    answer = lines[0]
    assert answer["jobStatus"] == "Good", answer
    return answer


@pytest.mark.parametrize("service", ["ModifySubscription", "CreateMonitoredItems", "ModifyMonitoredItems",
                                     "SetMonitoringMode", "DeleteMonitoredItems", "SetPublishingMode",
                                     "Republish", "Publish", "DeleteSubscriptions"])
def test_another_session_cannot_touch_a_subscription(server, service):
    """Each was answered Good (Republish: BadMessageNotAvailable, saying the subscription is there, and
    any message it held was handed over; Publish: its acknowledgement of the PLC's message taken) and
    did it: the PLC's next ResultReady never came after ModifyMonitoredItems, DeleteMonitoredItems,
    SetPublishingMode and DeleteSubscriptions, and DeleteMonitoredItems broke its own later calls."""
    answer = attempt(server, service)
    assert answer["status"] == "BadSubscriptionIdInvalid", answer
    assert answer["delivered"] is True, answer
    assert answer["own"] == OWN_GOOD, answer


def test_an_anonymous_session_cannot_take_a_subscription_by_transfer(server):
    """TransferSubscriptions moved the PLC's subscription to the anonymous session (Good), and the PLC's
    ResultReady events with it. OPC 10000-4 5.14.7: the new session must act for the same user."""
    answer = attempt(server, "TransferSubscriptions")
    assert answer["status"] == "BadUserAccessDenied", answer
    assert answer["delivered"] is True, answer
    assert answer["own"] == OWN_GOOD, answer
    assert answer["told"] == [], answer


def test_a_session_of_the_same_user_takes_a_subscription_by_transfer(server):
    """What TransferSubscriptions is for (a client that opened a new session takes its subscriptions
    along): another session of the same user is given it, and the events go there, not to the old one.
    asyncua answered Good but the next event reached neither: it was sent to the new connection only as
    the answer to a Publish request taken from the old one."""
    answer = attempt(server, "TransferSubscriptions", "user")
    assert answer["status"] == "Good", answer
    assert answer["delivered"] is False, answer
    assert answer["received"] is True, answer
    assert answer["own"] == dict.fromkeys(OWN_GOOD, "BadSubscriptionIdInvalid"), answer      # no longer its own
    # OPC 10000-4 5.14.7: the old session is told (asyncua told it nothing: its client went on waiting)
    assert answer["told"] == ["GoodSubscriptionTransferred"], answer


def test_a_session_is_not_taken_by_guessing_its_token(server):
    """A client back on a new connection reactivates its session by the AuthenticationToken CreateSession
    gave it (OPC 10000-4 7.36: the secret form of the session id). asyncua counted them (i=1001, i=1002,
    ...): an anonymous client read its own, sent ActivateSession with the one before it on a new connection
    and was answered Good on the first guess; the PLC's session became anonymous (its StartSingleJob then
    BadUserAccessDenied) and its ResultReady events went to the other connection. Now a token is 32 random
    bytes."""
    done = subprocess.run([node_client_ready(), "hijack.js", server, USER, PASSWORD], cwd=OPCUA_CLIENT_DIR,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    answer = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"kind":"hijack"')][0]
    assert answer["taken"] is None, answer
    assert answer["callStatus"] == "Good" and answer["delivered"] is True, answer
    assert answer["ownTokenType"] == "BYTESTRING" and answer["ownTokenBytes"] == 32, answer
