"""
Settings to running services: the only place that wires components together.

Plugins are built here, so every plugin option error is found at start-up and
reported with the file, section and key it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.server import Site
from zope.interface.interface import InterfaceClass

from relay import plugin
from relay.config import Settings
from relay.delivery.router import Router
from relay.errors import ConfigError, OptionError
from relay.interfaces import IDeliveryBackendFactory, IQueueStoreFactory, IRecipientValidatorFactory
from relay.metrics import Metrics
from relay.policy import Policy
from relay.queue.scheduler import Scheduler
from relay.smtp.auth import PasswordFile, makePortal
from relay.smtp.server import ServerSettings, SMTPServerFactory
from relay.smtp.tls import TLSError, serverOptions, wrapImplicit


class RelayService(MultiService):
    """The relay: recovers the queue, then receives and delivers."""

    log = Logger()

    def __init__(self, settings: Settings, store: Any, scheduler: Scheduler) -> None:
        super().__init__()
        self.settings = settings
        self.store = store
        self.scheduler = scheduler

    def startService(self) -> None:
        d = maybeDeferred(self.store.recover)
        d.addCallback(self.scheduler.recovered)
        d.addErrback(lambda f: self.log.failure("queue recovery failed", f))
        super().startService()

    def stopService(self) -> Any:
        d = maybeDeferred(super().stopService)
        d.addCallback(lambda _: self._stopBackends())
        d.addCallback(lambda _: self.store.stop())
        return d

    def _stopBackends(self) -> Deferred[Any]:
        # After the scheduler has stopped: no attempt is running any more.
        stops = []
        for name, backend in self.scheduler.router.backends.items():
            d = maybeDeferred(backend.stop)
            d.addErrback(lambda f, name=name: self.log.failure("stopping backend {name} failed", f, name=name))
            stops.append(d)
        return DeferredList(stops)


def _build(
    settings: Settings,
    interface: InterfaceClass,
    name: str,
    options: Mapping[str, str],
    context: plugin.PluginContext,
    pluginKey: str = "plugin",
) -> Any:
    try:
        factory = plugin.find(name, interface)
        plugin.checkKeys(factory, options)
        return factory.build(options, context)
    except OptionError as e:
        key = pluginKey if e.key == "plugin" else e.key
        raise ConfigError(str(settings.path), context.section, key, e.message) from None


def _tlsOptions(settings: Settings) -> Any:
    """The server TLS context, loaded once for every listener that uses TLS."""
    if not any(listener.tls != "none" for listener in settings.listeners):
        return None
    assert settings.tls_certificate is not None and settings.tls_private_key is not None
    try:
        return serverOptions(settings.tls_certificate, settings.tls_private_key)
    except TLSError as e:
        raise ConfigError(str(settings.path), "tls", e.key, e.message) from None


def _listening(settings: Settings, reactor: Any) -> tuple[tuple[str, int], ...]:
    """
    C{(interface, port)} of each TCP listener, for backends that must not
    deliver to this relay itself.  The endpoint is only parsed here (nothing is
    bound); endpoints that are not TCP (UNIX sockets, systemd) and port 0 are
    left out: no MX can name them.
    """
    found = []
    for listener in settings.listeners:
        endpoint = serverFromString(reactor, listener.endpoint)
        port = getattr(endpoint, "_port", None)
        interface = getattr(endpoint, "_interface", None)
        if isinstance(port, int) and port > 0 and isinstance(interface, str):
            found.append((interface, port))
    return tuple(found)


def buildService(settings: Settings, reactor: Any) -> RelayService:
    """
    Build every component named by the settings.

    @raise ConfigError: a plugin is unknown or refuses an option.
    """
    pool = reactor.getThreadPool()

    def blocking(f: Any, *args: Any, **kwargs: Any) -> Any:
        return deferToThreadPool(reactor, pool, f, *args, **kwargs)

    listening = _listening(settings, reactor)

    def context(section: str) -> plugin.PluginContext:
        return plugin.PluginContext(
            reactor=reactor,
            hostname=settings.hostname,
            postmaster=settings.postmaster,
            state_dir=settings.state_dir,
            section=section,
            blocking=blocking,
            listening=listening,
            delivery_timeout=settings.queue.delivery_timeout,
        )

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    queue = settings.queue
    store = _build(
        settings,
        IQueueStoreFactory,
        queue.store,
        {"path": str(queue.path), **queue.options},
        context("queue"),
        pluginKey="store",
    )
    validators = [
        (
            section.name,
            _build(settings, IRecipientValidatorFactory, section.plugin, section.options, context(section.section)),
        )
        for section in settings.validators
    ]
    backends = {
        name: _build(settings, IDeliveryBackendFactory, section.plugin, section.options, context(section.section))
        for name, section in settings.deliveries.items()
    }
    metrics = Metrics()
    router = Router(settings.route, backends)
    scheduler = Scheduler(
        store,
        router,
        reactor,
        queue.retry,
        queue.max_age,
        reportingMTA=settings.hostname,
        warnAfter=queue.warn_after,
        hold=queue.hold,
        concurrency=queue.concurrency,
        destinationConcurrency=queue.destination_concurrency,
        attemptTimeout=queue.delivery_timeout,
        metrics=metrics,
    )
    metrics.queued.set_function(scheduler.queued)
    top = RelayService(settings, store, scheduler)
    scheduler.setServiceParent(top)

    policy = Policy(
        settings.local_domains,
        settings.relay_networks,
        settings.route,
        validators,
        reactor,
        validatorTimeout=settings.validator_timeout,
        metrics=metrics,
        router=router,
    )
    base = ServerSettings(
        hostname=settings.hostname,
        postmaster=settings.postmaster,
        maxMessageSize=settings.max_message_size,
        maxRecipients=settings.max_recipients,
        policy=policy,
        store=store,
        onAccepted=lambda envelope: (metrics.accepted.inc(), scheduler.enqueue(envelope)),
        clock=reactor,
    )
    tlsOptions = _tlsOptions(settings)
    portal = None
    if settings.auth_passwords is not None and any(listener.auth != "none" for listener in settings.listeners):
        portal = makePortal(PasswordFile(settings.auth_passwords, blocking))
    for listener in settings.listeners:
        serverSettings = replace(
            base,
            tls=listener.tls,
            tlsOptions=tlsOptions,
            auth=listener.auth,
            plaintextAuth=listener.plaintext_auth,
            portal=portal,
        )
        factory: Any = SMTPServerFactory(serverSettings)
        if listener.tls == "implicit":
            factory = wrapImplicit(factory, tlsOptions, clock=reactor)
        endpoint = serverFromString(reactor, listener.endpoint)
        service = StreamServerEndpointService(endpoint, factory)
        service.setName(f"listener:{listener.name}")
        service.setServiceParent(top)
    if settings.metrics_endpoint is not None:
        site = Site(metrics.resource())
        site.noisy = False
        service = StreamServerEndpointService(serverFromString(reactor, settings.metrics_endpoint), site)
        service.setName("metrics")
        service.setServiceParent(top)
    return top
