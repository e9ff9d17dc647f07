"""A subscription belongs to the session that created it (OPC 10000-4 5.14): the subscription services
of another session answer Bad_SubscriptionIdInvalid for it, as for an id that does not exist.

asyncua 2.x keeps every session's subscriptions in one table (SubscriptionService.subscriptions) and its
services look the ids they are given up there, whichever session asks: an anonymous client that guessed a
PLC's SubscriptionId (handed out in order from 78) could modify or delete its subscription, disable its
publishing, create, modify, disable or delete its MonitoredItems, acknowledge its held messages (gone for
Republish) and read them with Republish. Here each external session is given its own view of that service
(_SessionSubscriptions), which passes on only the ids its session owns (``owns``, the one rule).

A session itself is reached from a new secure channel by its AuthenticationToken, which asyncua counted:
each is made a random secret here (secret_session_tokens).

TransferSubscriptions moves a subscription to the calling session: asyncua did it for anyone, so an
anonymous client took the PLC's subscription and its ResultReady events with it. OPC 10000-4 5.14.7 has
the server check that the new session acts for the same user as the one that owns it
(Bad_UserAccessDenied otherwise): here the same user name, never an anonymous session (the spec's
anonymous case, the same ApplicationUri over Sign or SignAndEncrypt, is not offered: a client that lost
its session creates its subscriptions again). The old session is told (Good_SubscriptionTransferred),
which asyncua did not do.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone


def owns(session, subscription) -> bool:
    """Whether ``session`` (asyncua's InternalSession) owns ``subscription`` (an InternalSubscription):
    the rule every subscription service of that session goes through. A session reactivated on a new
    secure channel (a reconnecting client) is the same session: it keeps its subscriptions."""
    return subscription is not None and subscription.session_id == session.session_id


def session_of(iserver, session_id):
    """The session (asyncua's InternalSession: an external one, or the server's own) whose id is
    ``session_id``; None where it has gone (closed without deleting its subscriptions)."""
    for session in [*list(getattr(iserver, "_external_sessions", {}).values()), getattr(iserver, "isession", None)]:
        if session is not None and getattr(session, "session_id", None) == session_id:
            return session
    return None


def same_user(a, b) -> bool:
    """Whether two sessions' users (asyncua's User; None unknown) are the same one, who may take over the
    other's subscriptions: the same role and name, and not anonymous."""
    from asyncua.crypto.permission_rules import UserRole
    return (a is not None and b is not None and a.role != UserRole.Anonymous and a.name is not None
            and (a.role, a.name) == (b.role, b.name))


def _set_user(subscription, user) -> None:
    """Remember the user a subscription was created or transferred for: its session may be gone (closed
    without deleting its subscriptions) when a client of that user transfers it."""
    if subscription is not None:
        subscription.mrkd_user = user


def secret_session_tokens(iserver) -> bool:
    """Give each external session a random AuthenticationToken (32 bytes). A client reactivating its
    session on a new secure channel names it by that token alone (asyncua's UaProcessor looks it up among
    the sessions and hands the new channel the session and its subscriptions, before the identity token
    is checked); OPC 10000-4 7.36 makes it the secret form of the session id. asyncua counted them from
    1000 in every server of the process: another client read its own token, took the one before it and
    had the PLC's session, made anonymous, with its ResultReady events. False, changing nothing, where
    this asyncua keeps its sessions elsewhere."""
    create = getattr(iserver, "create_session", None)
    register = getattr(iserver, "register_external_session", None)
    unregister = getattr(iserver, "unregister_external_session", None)
    if create is None or register is None or unregister is None:
        return False

    def create_session(*args, **kwargs):
        from asyncua import ua
        session = create(*args, **kwargs)
        if getattr(session, "external", False) and hasattr(session, "auth_token"):
            unregister(session)       # registered under the counted token as it was made
            session.auth_token = ua.NodeId(os.urandom(32), 0, ua.NodeIdType.ByteString)
            register(session)
        return session

    iserver.create_session = create_session
    return True


def own_subscriptions_only(iserver) -> bool:
    """Give each external session asyncua creates (``iserver.create_session``) a view of the subscription
    service that passes on only its own subscriptions. False, changing nothing, where this asyncua creates
    its sessions or keeps its subscriptions elsewhere."""
    create = getattr(iserver, "create_session", None)
    service = getattr(iserver, "subscription_service", None)
    if create is None or not isinstance(getattr(service, "subscriptions", None), dict):
        return False

    def create_session(*args, **kwargs):
        session = create(*args, **kwargs)
        if getattr(session, "external", False) and getattr(session, "subscription_service", None) is service:
            session.subscription_service = _SessionSubscriptions(service, session)
        return session

    iserver.create_session = create_session
    return True


def _connection_of(subscription):
    """The connection (asyncua's UaProcessor) whose Publish requests ``subscription`` answers, or None."""
    callback = getattr(subscription, "pub_request_callback", None)
    connection = getattr(callback, "__self__", None)
    return connection if hasattr(connection, "forward_publish_response") else None


async def _tell_transferred(old, subscription) -> None:
    """OPC 10000-4 5.14.7: the session a subscription was transferred from is told so, by a
    StatusChangeNotification Good_SubscriptionTransferred answering one of its Publish requests (none
    waiting: a client gone or between requests; it is not told). Its connection also forgets that it owed
    this subscription an answer: asyncua would otherwise answer its next Publish request with the moved
    subscription's notifications."""
    from asyncua import ua
    sid = subscription.data.SubscriptionId
    pending = getattr(old, "_publish_results_subs", None)
    if isinstance(pending, dict):
        pending.pop(sid, None)
    if not getattr(old, "_publish_requests", None):
        return
    request = old.get_publish_request(sid)
    if isinstance(pending, dict):
        pending.pop(sid, None)         # registered again where the waiting requests had all timed out
    if request is None:
        return
    result = ua.PublishResult()
    result.SubscriptionId = sid
    # the number the subscription's next message will carry, as a keep-alive does: this one takes none
    result.NotificationMessage.SequenceNumber = getattr(subscription, "_notification_seq", 1)
    result.NotificationMessage.PublishTime = datetime.now(timezone.utc)
    result.NotificationMessage.NotificationData = [
        ua.StatusChangeNotification(Status=ua.StatusCode(ua.StatusCodes.GoodSubscriptionTransferred))]
    result.AvailableSequenceNumbers = []
    await old.forward_publish_response(result, request)


class _SessionSubscriptions:
    """asyncua's SubscriptionService as one session may use it: an id of a subscription the session does
    not own is answered as an unknown one (Bad_SubscriptionIdInvalid): the whole request where the service
    names one subscription, that id's result where it names several (the others are done)."""

    def __init__(self, service, session):
        self._service, self._session = service, session

    def __getattr__(self, name):
        return getattr(self._service, name)

    def _owned(self, subscription_id) -> bool:
        return owns(self._session, self._service.subscriptions.get(subscription_id))

    def _check(self, subscription_id) -> None:
        if not self._owned(subscription_id):
            from asyncua import ua
            from asyncua.common.utils import ServiceError
            raise ServiceError(ua.StatusCodes.BadSubscriptionIdInvalid)

    def _split(self, ids) -> list:
        """Which of ``ids`` this session owns, one bool each (decided before the service runs: a deleted
        subscription is no longer there to be owned)."""
        return [self._owned(i) for i in ids]

    @staticmethod
    def _merge(owned: list, results) -> list:
        """The results of the owned ids (``results``, in their order) and Bad_SubscriptionIdInvalid for the
        others, in the order of the request."""
        from asyncua import ua
        results = iter(results)
        return [next(results) if mine else ua.StatusCode(ua.StatusCodes.BadSubscriptionIdInvalid) for mine in owned]

    async def create_subscription(self, params, *args, **kwargs):
        result = await self._service.create_subscription(params, *args, **kwargs)
        _set_user(self._service.subscriptions.get(result.SubscriptionId), self._session.user)
        return result

    async def transfer_subscriptions(self, params, session_id, callback):
        """Of another session's subscriptions, only those of the same user (not anonymous) move here;
        Bad_UserAccessDenied for the others. Unknown ids and this session's own are asyncua's to answer."""
        from asyncua import ua
        ids = list(params.SubscriptionIds or [])
        refused = [self._transfer_refused(i) for i in ids]
        allowed = [i for i, no in zip(ids, refused) if not no]
        # the connections the moving subscriptions answered Publish requests on until now (another session's)
        old_connections = {i: _connection_of(self._service.subscriptions.get(i)) for i in allowed
                           if not self._owned(i)}
        results = iter(await self._service.transfer_subscriptions(ua.TransferSubscriptionsParameters(
            SubscriptionIds=allowed, SendInitialValues=params.SendInitialValues), session_id, callback)
            if allowed else [])
        results = list(results)
        # asyncua sends a transferred subscription's messages to the new connection but still takes the
        # Publish requests they answer from the old one's queue: neither client got them. The new
        # connection's (the UaProcessor whose forward_publish_response ``callback`` is) from now on, as
        # asyncua does for a session reactivated on a new connection.
        requests = getattr(getattr(callback, "__self__", None), "get_publish_request", None)
        for i, result in zip(allowed, results):
            subscription = self._service.subscriptions.get(i)
            if subscription is not None and result.StatusCode.is_good():
                _set_user(subscription, self._session.user)
                if requests is not None:
                    subscription.pub_request_callback = requests
                old = old_connections.get(i)
                if old is not None and old is not getattr(requests, "__self__", None):
                    await _tell_transferred(old, subscription)
        results = iter(results)
        return [ua.TransferResult(StatusCode=ua.StatusCode(ua.StatusCodes.BadUserAccessDenied)) if no
                else next(results) for no in refused]

    def _transfer_refused(self, subscription_id) -> bool:
        subscription = self._service.subscriptions.get(subscription_id)
        if subscription is None or owns(self._session, subscription):
            return False
        owner = session_of(self._session.iserver, subscription.session_id)
        return not same_user(owner.user if owner is not None else getattr(subscription, "mrkd_user", None),
                             self._session.user)

    def modify_subscription(self, params):
        self._check(params.SubscriptionId)
        return self._service.modify_subscription(params)

    async def delete_subscriptions(self, ids):
        owned = self._split(ids)
        mine = [i for i, m in zip(ids, owned) if m]
        return self._merge(owned, await self._service.delete_subscriptions(mine) if mine else [])

    async def set_publishing_mode(self, params):
        from asyncua import ua
        ids = list(params.SubscriptionIds or [])
        owned = self._split(ids)
        mine = [i for i, m in zip(ids, owned) if m]
        return self._merge(owned, await self._service.set_publishing_mode(ua.SetPublishingModeParameters(
            PublishingEnabled=params.PublishingEnabled, SubscriptionIds=mine)) if mine else [])

    def publish(self, acks):
        """A Publish request's acknowledgements: only of this session's subscriptions (one of another
        session's took a message it may still need from its retransmission queue)."""
        acks = list(acks or [])
        owned = self._split([ack.SubscriptionId for ack in acks])
        count, results = self._service.publish([ack for ack, m in zip(acks, owned) if m])
        return count, self._merge(owned, results)

    async def create_monitored_items(self, params):
        self._check(params.SubscriptionId)
        return await self._service.create_monitored_items(params)

    def modify_monitored_items(self, params):
        self._check(params.SubscriptionId)
        return self._service.modify_monitored_items(params)

    async def set_monitoring_mode(self, params):
        self._check(params.SubscriptionId)
        return await self._service.set_monitoring_mode(params)

    def delete_monitored_items(self, params):
        self._check(params.SubscriptionId)
        return self._service.delete_monitored_items(params)

    def republish(self, params):
        self._check(params.SubscriptionId)
        return self._service.republish(params)
