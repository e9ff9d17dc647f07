"""Republish as OPC 10000-4 (5.13.6) defines it, in place of asyncua 2.x's.

A client that lost its connection reactivates its session on a new secure channel and asks Republish
for the notification messages it may have missed, one sequence number after another, until the server
answers Bad_MessageNotAvailable: then it has everything. asyncua answers a message it does not hold (and
an unknown subscription) with Good and an empty message instead, so node-opcua went on asking, about 800
requests a second for as long as the session lived, and the ResultReady events of parts judged while it
was away stayed lost behind that loop. Here a message not held answers Bad_MessageNotAvailable and an
unknown subscription Bad_SubscriptionIdInvalid (as ServiceFaults); a message held is asyncua's answer.
"""

from __future__ import annotations


def answer_republish_as_specified(subscription_service) -> bool:
    """Wrap asyncua's ``SubscriptionService.republish`` of a server (``server.iserver.subscription_service``);
    False, changing nothing, where this asyncua keeps its unacknowledged messages elsewhere."""
    original = getattr(subscription_service, "republish", None)
    if original is None or not isinstance(getattr(subscription_service, "subscriptions", None), dict):
        return False

    def republish(params):
        from asyncua import ua
        from asyncua.common.utils import ServiceError
        subscription = subscription_service.subscriptions.get(params.SubscriptionId)
        if subscription is None:
            raise ServiceError(ua.StatusCodes.BadSubscriptionIdInvalid)
        held = getattr(subscription, "_not_acknowledged_results", None)
        if isinstance(held, dict) and params.RetransmitSequenceNumber not in held:
            raise ServiceError(ua.StatusCodes.BadMessageNotAvailable)
        return original(params)

    subscription_service.republish = republish
    return True
