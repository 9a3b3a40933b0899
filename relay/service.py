"""
Settings to running services: the only place that wires components together.

Plugins are built here, so every plugin option error is found at start-up and
reported with the file, section and key it came from.
"""

from __future__ import annotations

import atexit
import os
import re
import resource
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site
from zope.interface.interface import InterfaceClass

from relay import plugin
from relay.config import Settings, ThreadSettings
from relay.control import controlService
from relay.delivery.router import Router
from relay.errors import ConfigError, OptionError
from relay.fsutil import makeDirectories
from relay.interfaces import (
    IDeliveryBackendFactory,
    IMessageFilterFactory,
    IQueueStoreFactory,
    IRecipientValidatorFactory,
)
from relay.logs import logEvent
from relay.metrics import Metrics
from relay.policy import Policy
from relay.queue.scheduler import Scheduler, isHeld
from relay.smtp.auth import PasswordFile, makePortal
from relay.smtp.limits import SessionLimits, sessionCap
from relay.smtp.proxied import ProxyFactory
from relay.smtp.server import ServerSettings, SMTPServerFactory, listenerSettings
from relay.smtp.throttle import AuthThrottle
from relay.smtp.tls import TLSError, serverOptions, wrapImplicit


class Listener(StreamServerEndpointService):
    """
    A listener that binds at once (as root if need be, and a taken port
    stops start-up) but accepts no connection until it is started: until the
    queue has been recovered, a client waits in the kernel's backlog, and if
    recovery fails the process ends without having answered anyone.
    """

    _opened = False
    _listening: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        self._listening = port
        if port is not None and not self._opened:
            pause = getattr(port, "stopReading", None)  # TCP and UNIX ports; others accept at once
            if pause is not None:
                pause()
        return port

    def startService(self) -> None:
        super().startService()
        self._opened = True
        resume = getattr(self._listening, "startReading", None)
        if resume is not None:
            resume()


class Executors:
    """
    One bounded thread pool per kind of blocking work ([threads]): password
    hashing (C{auth}), DNS lookups (C{dns}), delivery backends' file work
    (C{delivery}), validators (C{validators}) and content filters (C{filters}:
    DKIM signing).  A storm of AUTH guesses
    fills the auth pool and nothing else, so a local delivery or a validator
    still finds its threads free; a slow resolver holds up no maildir write.
    The queue store and anything else keep the reactor's own pool
    (C{general}).  Threads are made on demand, up to each pool's size.
    """

    KINDS = ("auth", "dns", "delivery", "validators", "filters")

    def __init__(self, reactor: Any, threads: ThreadSettings) -> None:
        self.reactor = reactor
        self.pools: dict[str, ThreadPool] = {
            kind: ThreadPool(minthreads=0, maxthreads=getattr(threads, kind), name=f"relay-{kind}")
            for kind in self.KINDS
        }
        self.running = False

    def pool(self, kind: str) -> ThreadPool:
        """The pool for C{kind}; C{general} is the reactor's own."""
        if kind == "general":
            return self.reactor.getThreadPool()
        return self.pools[kind]

    def runner(self, kind: str) -> Callable[..., Deferred[Any]]:
        """A C{blocking(f, *args, **kwargs)} that runs in C{kind}'s pool and returns a Deferred."""
        reactor = self.reactor

        def blocking(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
            return deferToThreadPool(reactor, self.pool(kind), f, *args, **kwargs)

        return blocking

    def start(self) -> None:
        """Work handed over before this waits in the pool's queue; it runs now."""
        if not self.running:
            self.running = True
            for pool in self.pools.values():
                pool.start()

    def stop(self) -> None:
        """
        Once nothing hands work over any more: queued work finishes, then
        every thread ends (each pool joins its threads).
        """
        if self.running:
            self.running = False
            for pool in self.pools.values():
                pool.stop()


class StartupError(Exception):
    """Start-up cannot go on (a listener cannot bind); the message is one line for the operator."""


def _raiseStartupError(message: str) -> None:
    raise StartupError(message)


def exitOnFatal(reactor: Any, message: str) -> None:
    """
    Stop the process with a non-zero status and C{message} as one line on
    standard error (twistd has no exit status of its own: it is set once
    twistd has cleaned up, its pid file included).
    """
    os.write(2, f"relay: {message}\n".encode(errors="replace"))
    atexit.register(os._exit, 1)
    reactor.callWhenRunning(reactor.stop)


class RelayService(MultiService):
    """
    The relay: recovers the queue, then receives and delivers.  Nothing is
    started (no session answered, no delivery attempted) until the store's
    recovery succeeded; if it fails, the process stops (C{onFatal}) rather
    than accept mail it may be unable to keep.
    """

    log = Logger()

    def __init__(
        self,
        settings: Settings,
        store: Any,
        scheduler: Scheduler,
        onFatal: Callable[[str], None] | None = None,
        executors: Executors | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.executors = executors
        self.store = store
        self.scheduler = scheduler
        self.onFatal = onFatal
        self.recovery: Deferred[None] | None = None
        self.logObserver: Any = None
        """An observer for C{twistd} to log through (see L{relay.logs}), or None for its own."""
        self.startupFailed: Callable[[str], None] = _raiseStartupError
        """Called with one line when a listener cannot bind; must not return (twistd sets how to exit)."""
        self.factories: list[Any] = []
        self.filters: Any = None
        """The content filters (a L{relay.filters.runner.FilterChain}) or None: stopped last, replaced on reload."""
        """The SMTP server factories of the listeners: told to stop, and given new settings on reload."""
        self.clock: Any = None
        self.rebuild: Callable[[Settings], Callable[[], None]] | None = None
        """Builds what a reload replaces from new settings and returns the function that puts it in place."""
        self.stopping = False

    def setServiceParent(self, parent: Any) -> Any:
        # twistd asks the application for an ILogObserver only after
        # makeService, so this is where the relay can offer its own.
        if self.logObserver is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.logObserver)
        return super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        """
        Bind every listener (SMTP, metrics, control) now, before the reactor
        runs and before twistd reports a daemon started: one that cannot bind
        stops start-up with one line naming it, instead of a traceback and a
        relay running with nothing listening.
        """
        Service.privilegedStartService(self)
        for service in self:
            if hasattr(service, "_raiseSynchronously"):
                service._raiseSynchronously = True  # an endpoint's error raised here, not only logged
            try:
                service.privilegedStartService()
            except Exception as e:
                endpoint = getattr(service, "endpoint", None)
                where = str(getattr(endpoint, "_port", None) or getattr(endpoint, "_address", None) or "")
                if getattr(endpoint, "_interface", None):
                    where = f"{endpoint._interface}:{where}"
                what = service.name or type(service).__name__
                reason = getattr(e, "socketError", None) or e
                if isinstance(reason, OSError) and reason.strerror:
                    reason = reason.strerror
                self.startupFailed(f"{what}: cannot listen{f' on {where}' if where else ''}: {reason}")
                raise  # startupFailed did not stop start-up: twistd will

    def startService(self) -> None:
        Service.startService(self)  # the children start once the queue is known to be usable
        if self.executors is not None:
            self.executors.start()
        d = maybeDeferred(self.store.recover)
        d.addCallbacks(self._recovered, self._recoveryFailed)
        d.addErrback(self._startFailed)
        self.recovery = d

    def _recovered(self, count: int | None) -> None:
        if not self.running:
            return  # stopped while recovering
        self.scheduler.recovered(count)
        for service in self:
            service.startService()

    def _recoveryFailed(self, failure: Failure) -> None:
        message = f"cannot use the queue at {self.settings.queue.path}: {failure.getErrorMessage()}"
        self.log.critical("{message}; stopping", message=message)
        if self.onFatal is not None:
            self.onFatal(message)

    def _startFailed(self, failure: Failure) -> None:
        self.log.failure("start-up failed", failure)
        if self.onFatal is not None:
            self.onFatal(f"start-up failed: {failure.getErrorMessage()}")

    def stopService(self) -> Any:
        """
        Graceful stop: every listener stops listening at once; sessions in
        the middle of a transaction may finish it within C{[relay]
        shutdown_grace}, the others get C{421 4.3.2} at once (see
        L{SMTPServerFactory.shutdown}); deliveries still running after the
        grace are abandoned without being marked, so their messages stay
        queued for the next start.
        """
        Service.stopService(self)
        self.stopping = True
        grace = getattr(self.settings, "shutdown_grace", 30.0)
        listeners = [service for service in reversed(list(self)) if service is not self.scheduler]
        stops = [maybeDeferred(service.stopService) for service in listeners if service.running]
        if self.scheduler.running:
            stops.append(
                self._bounded(
                    maybeDeferred(self.scheduler.stopService),
                    grace,
                    "deliveries in flight",
                    self._logAbandonedAttempts,
                )
            )
        stops.extend(self._bounded(factory.shutdown(grace), grace + 2.0, "sessions") for factory in self.factories)
        d: Deferred[Any] = DeferredList(stops)
        d.addCallback(lambda _: self._stopBackends())
        d.addCallback(lambda _: self._stopFilters())
        d.addCallback(lambda _: self.store.stop())
        d.addBoth(self._stopExecutors)
        return d

    def _bounded(
        self, d: Deferred[Any], seconds: float, what: str, onAbandon: Callable[[], None] | None = None
    ) -> Deferred[Any]:
        """C{d}, or None after C{seconds}: whatever is still running then is abandoned (and logged)."""
        if self.clock is None or d.called:
            return d
        bounded: Deferred[Any] = Deferred()

        def late() -> None:
            self.log.warn("stopping: {what} still running after {seconds}s, abandoned", what=what, seconds=seconds)
            if onAbandon is not None:
                onAbandon()
            bounded.callback(None)

        timer = self.clock.callLater(seconds, late)

        def done(result: Any) -> None:
            if timer.active():
                timer.cancel()
                bounded.callback(None)
            if isinstance(result, Failure):
                self.log.failure("stopping {what} failed", result, what=what)

        d.addBoth(done)
        return bounded

    def _logAbandonedAttempts(self) -> None:
        """
        One line per attempt cut off by the stop: its outcome is never stored,
        so the next start tries those recipients again.  Where the next hop had
        already answered 250, that is the one way a message arrives twice.
        """
        for queueID, destinations in sorted(self.scheduler.attemptsInFlight().items()):
            for backend, domain in sorted(destinations):
                logEvent(
                    self.log,
                    "abandoned",
                    {
                        "queue_id": queueID,
                        "backend": backend,
                        "domain": domain,
                        "note": "not stored: tried again at the next start, twice over if already delivered",
                    },
                    LogLevel.warn,
                )

    def reload(self, load: Callable[[str], Settings] | None = None) -> bool:
        """
        Re-read the configuration file (SIGHUP): policy, routes, validators,
        backends, certificates and the passwords file take effect for new
        sessions and deliveries; open connections and running deliveries
        keep what they started with.  A file that does not load is refused
        with a line naming file, section and key, and the running
        configuration stays.  What cannot change without a restart
        (listeners, the queue, state_dir, endpoints) is logged as such.
        """
        if load is None:
            from relay.config import load
        if self.stopping or self.rebuild is None:
            return False
        try:
            settings = load(str(self.settings.path))
            apply = self.rebuild(settings)
        except ConfigError as e:
            self.log.error("reload refused, the running configuration stays: {error}", error=str(e))
            return False
        except Exception as e:
            self.log.failure("reload refused, the running configuration stays: {error}", error=str(e))
            return False
        for key in _RESTART_KEYS:
            if getattr(settings, key) != getattr(self.settings, key):
                self.log.warn("reload: [{key}] changed; it takes a restart to apply", key=key)
        apply()
        self.settings = replace(
            self.settings, **{name: getattr(settings, name) for name in _RELOADED_KEYS}
        )  # the rest stays as running
        self.log.info("reloaded {path}", path=str(self.settings.path))
        return True

    def _stopExecutors(self, result: Any) -> Any:
        # Last: the store, backends and listeners hand over no more work.
        if self.executors is not None:
            self.executors.stop()
        return result

    def _stopFilters(self) -> Deferred[Any] | None:
        # After the sessions: no message is being filtered any more.
        chain = getattr(self, "filters", None)
        return chain.stop() if chain is not None else None

    def _stopBackends(self) -> Deferred[Any]:
        # After the scheduler has stopped: no attempt is running any more.
        stops = []
        for name, backend in self.scheduler.router.backends.items():
            d = maybeDeferred(backend.stop)
            d.addErrback(lambda f, name=name: self.log.failure("stopping backend {name} failed", f, name=name))
            stops.append(d)
        return DeferredList(stops)


# What a reload cannot change: logged as needing a restart.
_RESTART_KEYS = (
    "hostname",
    "postmaster",
    "state_dir",
    "listeners",
    "queue",
    "control_endpoint",
    "metrics_endpoint",
    "max_sessions",
    "auth",
    "threads",
)
# What a reload takes.
_RELOADED_KEYS = (
    "tls_certificate",
    "tls_private_key",
    "auth_passwords",
    "local_domains",
    "relay_networks",
    "max_message_size",
    "max_recipients",
    "validators",
    "filters",
    "filter_trace",
    "deliveries",
    "routes",
    "validator_timeout",
    "shutdown_grace",
)


class CurrentTLS:
    """
    The server TLS options of an implicit-TLS listener, replaceable on
    reload: the TLS factory asks for a context per connection, so a new
    certificate serves new connections and open ones keep theirs.
    """

    def __init__(self, options: Any) -> None:
        self.options = options

    def getContext(self) -> Any:
        return self.options.getContext()


def _usableStateDir(settings: Settings) -> None:
    """
    Make C{state_dir} (durably) and check the relay can write in it: one
    line naming the key, not a traceback from deep in the queue store.
    """
    try:
        makeDirectories(settings.state_dir, mode=0o777)
    except OSError as e:
        raise ConfigError(
            str(settings.path), "relay", "state_dir", f"cannot use {settings.state_dir}: {e.strerror or e}"
        ) from None
    if not os.access(settings.state_dir, os.W_OK | os.X_OK):
        raise ConfigError(
            str(settings.path), "relay", "state_dir", f"cannot use {settings.state_dir}: not writable by this user"
        )


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


def _filterChain(settings: Settings, reactor: Any, context: Callable[[str, str], plugin.PluginContext]) -> Any:
    """The content filters of C{[policy] filters}, or C{None}: then the server spools nothing."""
    if not settings.filters:
        return None
    from relay.filters.runner import FilterChain, FilterSpec

    specs = [
        FilterSpec(
            s.name,
            _build(settings, IMessageFilterFactory, s.plugin, s.options, context(s.section, "filters")),
            timeout=s.timeout,
            onError=s.on_error,
        )
        for s in settings.filters
    ]
    spoolDir = settings.state_dir / "spool"
    try:
        makeDirectories(spoolDir)
    except OSError as e:
        raise ConfigError(str(settings.path), "relay", "state_dir", f"cannot create {spoolDir}: {e}") from None
    return FilterChain(
        specs, reactor, spoolDir, settings.hostname, trace=settings.filter_trace, maxSize=settings.max_message_size
    )


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


# Endpoint types that take a listen backlog (Twisted's TCP, SSL and UNIX server endpoints).
_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")
_log = Logger()


def withBacklog(endpoint: str, backlog: int) -> str:
    """
    C{endpoint} with C{:backlog=N} appended when it is a TCP, SSL or UNIX
    server endpoint that names none.  Twisted's default is 50: a burst of
    connections beyond it (10,000 connects at a concurrency of 2,000 gave
    3,905 listen overflows) is dropped by the kernel before the relay can
    answer even a 421.  The kernel still caps it at C{net.core.somaxconn}.
    """
    kind = endpoint.split(":", 1)[0].strip().lower()
    if kind not in _BACKLOG_TYPES or re.search(r"(^|[^\\]):backlog=", endpoint):
        return endpoint
    return f"{endpoint}:backlog={backlog}"


def raiseFdLimit() -> tuple[int, int, int]:
    """
    Raise the soft limit on open descriptors to the hard limit where the
    system allows it; C{(before, now, hard)}.  Every session holds one (two
    while a message is stored), so the soft default of 1,024 would let a
    thousand idle connections shut everyone else out; the global session cap
    is then derived from what was obtained.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    now = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        for candidate in (target, 1 << 20, 65536):
            if candidate <= soft:
                break
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (candidate, hard))
            except (ValueError, OSError):
                continue
            now = candidate
            break
    return soft, now, hard


def buildService(settings: Settings, reactor: Any) -> RelayService:
    """
    Build every component named by the settings.

    @raise ConfigError: a plugin is unknown or refuses an option.
    """
    executors = Executors(reactor, settings.threads)
    listening = _listening(settings, reactor)

    from relay.delivery.tlsrpt import QueueSubmitter

    submitter = QueueSubmitter()  # for the mx backend's TLS reports; attached once the queue exists

    def context(section: str, kind: str) -> plugin.PluginContext:
        return plugin.PluginContext(
            reactor=reactor,
            hostname=settings.hostname,
            postmaster=settings.postmaster,
            state_dir=settings.state_dir,
            section=section,
            blocking=executors.runner(kind),
            listening=listening,
            delivery_timeout=settings.queue.delivery_timeout,
            dns=executors.runner("dns"),
            submit=submitter.submit,
        )

    # Durably (each parent fsynced): a power cut in the first run must not take back the queue.
    _usableStateDir(settings)
    queue = settings.queue
    store = _build(
        settings,
        IQueueStoreFactory,
        queue.store,
        {"path": str(queue.path), **queue.options},
        context("queue", "general"),
        pluginKey="store",
    )
    validators = [
        (
            section.name,
            _build(
                settings,
                IRecipientValidatorFactory,
                section.plugin,
                section.options,
                context(section.section, "validators"),
            ),
        )
        for section in settings.validators
    ]
    backends = {
        name: _build(
            settings, IDeliveryBackendFactory, section.plugin, section.options, context(section.section, "delivery")
        )
        for name, section in settings.deliveries.items()
    }
    filters = _filterChain(settings, reactor, context)
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
        activeLimit=queue.active_limit,
        destinationConcurrency=queue.destination_concurrency,
        attemptTimeout=queue.delivery_timeout,
        metrics=metrics,
    )
    submitter.attach(store, scheduler, reactor)
    metrics.watchScheduler(scheduler)
    metrics.watchStore(store)
    top = RelayService(
        settings, store, scheduler, onFatal=lambda message: exitOnFatal(reactor, message), executors=executors
    )
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
        onAccepted=lambda envelope: (metrics.accepted.inc(), isHeld(envelope) or scheduler.enqueue(envelope)),
        metrics=metrics,
        clock=reactor,
        commitTimeout=queue.commit_timeout,
        etrn=scheduler.etrn,
        filters=filters,
    )
    top.filters = filters
    tlsOptions = _tlsOptions(settings)
    portal = None
    if settings.auth_passwords is not None and any(listener.auth != "none" for listener in settings.listeners):
        portal = makePortal(
            PasswordFile(settings.auth_passwords, executors.runner("auth"), maxCost=settings.auth.max_bcrypt_cost)
        )
    before, fdLimit, hard = raiseFdLimit()
    limits = SessionLimits(reactor, sessionCap(settings.max_sessions, fdLimit))
    _log.info(
        "open file limit {fds} (was {before}, hard limit {hard}); at most {sessions} sessions",
        fds=fdLimit,
        before=before,
        hard="unlimited" if hard == resource.RLIM_INFINITY else hard,
        sessions=limits.maxSessions,
    )
    base = replace(base, limits=limits, authThrottle=AuthThrottle(reactor, settings.auth))
    currentTLS: list[CurrentTLS] = []
    for listener in settings.listeners:
        serverSettings = replace(
            listenerSettings(base, listener),
            tls=listener.tls,
            tlsOptions=tlsOptions,
            auth=listener.auth,
            plaintextAuth=listener.plaintext_auth,
            portal=portal,
        )
        factory: Any = SMTPServerFactory(serverSettings)
        top.factories.append(factory)
        if listener.tls == "implicit":
            currentTLS.append(CurrentTLS(tlsOptions))
            factory = wrapImplicit(factory, currentTLS[-1], clock=reactor)
        if listener.proxy_protocol != "no":
            # Outermost: the header comes in clear before anything, a TLS handshake included.
            version = 1 if listener.proxy_protocol == "v1" else 2
            factory = ProxyFactory(
                factory,
                version,
                reactor,
                timeout=listener.proxy_timeout,
                maxPending=limits.maxSessions,
                metrics=metrics,
            )
        endpoint = serverFromString(reactor, withBacklog(listener.endpoint, listener.backlog))
        service = Listener(endpoint, factory)
        service.setName(f"listener:{listener.name}")
        service.setServiceParent(top)
    if settings.metrics_endpoint is not None:
        site = Site(metrics.resource())
        site.noisy = False
        service = StreamServerEndpointService(serverFromString(reactor, settings.metrics_endpoint), site)
        service.setName("metrics")
        service.setServiceParent(top)
    # The control socket relayctl talks to (relay.control): always on.
    controlService(
        settings, reactor, scheduler, sessions=lambda: limits.sessions, reload=getattr(top, "reload", None)
    ).setServiceParent(top)
    top.clock = reactor

    def rebuild(new: Settings) -> Callable[[], None]:
        # Everything that can fail is built here, before anything is replaced.
        newValidators = [
            (s.name, _build(new, IRecipientValidatorFactory, s.plugin, s.options, context(s.section, "validators")))
            for s in new.validators
        ]
        newBackends = {
            name: _build(new, IDeliveryBackendFactory, s.plugin, s.options, context(s.section, "delivery"))
            for name, s in new.deliveries.items()
        }
        newFilters = _filterChain(new, reactor, context)
        newRouter = Router(new.route, newBackends)
        newPolicy = Policy(
            new.local_domains,
            new.relay_networks,
            new.route,
            newValidators,
            reactor,
            validatorTimeout=new.validator_timeout,
            metrics=metrics,
            router=newRouter,
        )
        newTLS = _tlsOptions(replace(new, listeners=settings.listeners))
        newPortal = None
        if new.auth_passwords is not None and any(listener.auth != "none" for listener in settings.listeners):
            newPortal = makePortal(
                PasswordFile(new.auth_passwords, executors.runner("auth"), maxCost=settings.auth.max_bcrypt_cost)
            )

        def apply() -> None:
            old = scheduler.router.backends
            scheduler.router = newRouter
            for factory in top.factories:
                factory.settings = replace(
                    factory.settings,
                    policy=newPolicy,
                    maxMessageSize=new.max_message_size,
                    maxRecipients=new.max_recipients,
                    tlsOptions=newTLS if factory.settings.tls != "none" else None,
                    portal=newPortal,
                    filters=newFilters,
                )
            oldFilters, top.filters = top.filters, newFilters
            if oldFilters is not None:
                # Messages being filtered keep the old filters until their filter_timeout at most.
                longest = max(spec.timeout for spec in oldFilters.filters)
                reactor.callLater(longest + 1.0, oldFilters.stop)
            for current in currentTLS:
                current.options = newTLS
            # Attempts already running keep the old backends until they end (delivery_timeout at most).
            reactor.callLater(settings.queue.delivery_timeout + 1.0, _stopOld, old)

        return apply

    def _stopOld(backends: Mapping[str, Any]) -> None:
        for name, backend in backends.items():
            d = maybeDeferred(backend.stop)
            d.addErrback(lambda f, name=name: _log.failure("stopping replaced backend {name} failed", f, name=name))

    top.rebuild = rebuild
    return top
