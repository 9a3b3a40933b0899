"""
The plugin contract.

Four parts of relay are pluggable: recipient validators, content filters,
delivery backends and queue stores.  Each comes as a pair of interfaces: the component itself, and a
factory that twisted.plugin discovers and that builds the component from its
configuration section.  The built-in components are registered exactly like
third-party ones (see C{relay/plugins/}).

Rules that hold for every method below:

  - A method may return its result directly or a L{Deferred} that fires with
    it.  Components must never block the reactor: blocking I/O goes through
    C{context.blocking} (a thread pool) that the factory was given.
  - A component that raises, or whose Deferred fails, costs one temporary
    failure (a 451 for a validator, a deferred attempt for a backend) and a log
    line with the traceback; it never costs the process or the session.
  - Text is C{str}, message bodies are C{bytes}; a component never decodes a
    body.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IPluginFactory(Interface):
    """
    What every relay plugin factory has, whatever it builds.

    Providers are found in a module of a C{relay/plugins/} dropin directory
    (and then also provide L{twisted.plugin.IPlugin}), through an entry point
    of the C{relay.plugins} group named as the factory (what works in an
    editable install), or by dotted path in config
    (C{plugin = package.module:factory}, providing C{IPlugin} too).
    """

    name = Attribute("The name the configuration uses: C{plugin = NAME}. Unique per interface.")
    description = Attribute("One line for C{relayctl plugins}.")
    keys = Attribute(
        "Mapping of each configuration key the plugin accepts to one line of help. "
        "The configuration layer refuses any key not listed here, naming file, "
        "section and key, before C{build} is called."
    )


class IRecipientValidator(Interface):
    """Decides, per recipient, whether the relay accepts it (RCPT TO time)."""

    def validate(recipient, session):
        """
        Judge one recipient.

        @param recipient: the address as text (C{local@domain}).
        @param session: a L{relay.verdict.SessionInfo} snapshot.
        @return: a L{relay.verdict.Verdict} (or a Deferred of one): CONTINUE for
            no opinion, ACCEPT, DENY (5xx) or DENY_SOFT (4xx).
        """


class IRecipientValidatorFactory(IPluginFactory):
    def build(options, context):
        """
        Build a validator.

        @param options: mapping of the C{[validator:NAME]} keys other than
            C{plugin}, all C{str}.
        @param context: a L{relay.plugin.PluginContext}.
        @raise relay.errors.OptionError: a key has a bad value.
        @return: an L{IRecipientValidator}.
        """


class IMessageFilter(Interface):
    """
    Judges a whole message once its data is complete, before the reply to
    end-of-data (a milter's place in Postfix): signs it, scans it, rejects it.

    Filters run one after another in the order of C{[policy] filters}, each
    seeing the message as the earlier ones left it, and only when at least
    one is configured (otherwise nothing is spooled or copied).  The server
    spools the data to an unlinked temporary file under C{state_dir} (bounded
    by C{max_message_size}), runs the filters, writes the (changed) message
    into the queue store and commits it, and only then answers 250 (or the
    verdict's reply).

    A filter that raises, whose Deferred fails, or that has not answered
    within its section's C{filter_timeout} costs the message a C{451 4.3.0}
    and a log line with the traceback, or, with C{on_error = accept} in its
    C{[filter:NAME]} section, is skipped with a log line; the session and the
    process go on either way.
    """

    def check(message):
        """
        Judge one message.

        @param message: a L{relay.filters.message.FilterMessage}: envelope,
            client, and the data through C{open()} (a file: read it a block
            at a time, or in a C{context.blocking} thread; never whole into
            memory unless bounded) and C{headers()}.
        @return: a L{relay.filters.verdict.FilterVerdict} (or a Deferred of
            one): CONTINUE, ACCEPT (no further filter), REJECT (5xx),
            TEMPFAIL (4xx), DISCARD or HOLD, with header, body and recipient
            changes applied whatever the decision.
        """

    def stop():
        """Close connections and release resources; may return a Deferred."""


class IMessageFilterFactory(IPluginFactory):
    def build(options, context):
        """
        Build a filter.

        @param options: mapping of the C{[filter:NAME]} keys other than
            C{plugin}, C{on_error} and C{filter_timeout} (which the relay
            handles), all C{str}.
        @param context: a L{relay.plugin.PluginContext}; C{context.section}
            is C{filter:NAME}.
        @raise relay.errors.OptionError: a key has a bad value.
        @return: an L{IMessageFilter}.
        """


class IDeliveryBackend(Interface):
    """
    Delivers one message to a set of recipients that share a route.

    A backend may also have an optional method, C{refuses(address)}, asked at
    RCPT TO for each recipient routed to it (after the relay-access check,
    before the validators):

        @param address: the recipient as text (C{local@domain}, the local
            part quoted when it must be).
        @return: a permanent refusal (a 5xx L{relay.envelope.Status}) that
            C{deliver} would certainly give this recipient, or C{None}.

    It lets the server refuse, at once, mail that would otherwise be accepted
    and bounced later, perhaps to a forged sender (backscatter).  It must be
    fast and never block: no I/O, no Deferred; answer from the address alone
    (the maildir backend refuses a local part that cannot be a mailbox path).
    Anything not certain is C{None}: C{deliver} still decides.  One that
    raises or returns anything else costs that recipient a 451 4.3.0 and a log
    line.  It is not declared below, so backends without it still provide
    this interface (and pass C{verifyObject}); they are never asked.
    """

    def deliver(envelope, recipients, openData):
        """
        Make one delivery attempt.

        @param envelope: the L{relay.envelope.Envelope}; read-only.
        @param recipients: the L{relay.envelope.Recipient}s to attempt now (a
            subset of the envelope's, all routed to this backend).
        @param openData: a callable returning a new binary file positioned at
            the start of the message (CRLF line endings, trace headers the
            receiving server added included).  The caller closes nothing; the
            backend closes what it opens.  Opening is cheap; a message may be
            as large as C{max_message_size}, so read it a block at a time, as
            fast as the destination takes it (a streaming producer, such as
            the SMTP client's or twisted.web's C{FileBodyProducer}), or in a
            C{context.blocking} thread: never whole, never faster than it
            leaves, so memory stays bounded whatever the message size.
        @return: a sequence of L{relay.envelope.DeliveryResult}, one per
            recipient (or a Deferred of it).  Only a 2xx status means
            delivered; a 5xx bounces; anything else (a 4xx, or any code the
            backend had no business returning) is retried.  A recipient with
            no result is retried.
        """

    def stop():
        """Close connections and release resources; may return a Deferred."""


class IDeliveryBackendFactory(IPluginFactory):
    def build(options, context):
        """
        Build a delivery backend from the keys of C{[delivery:NAME]} other
        than C{plugin}.

        @raise relay.errors.OptionError: a key has a bad value.
        @return: an L{IDeliveryBackend}.
        """


class IIncomingMessage(Interface):
    """
    A message being received; nothing of it is visible until committed.

    It may also have an optional method, C{writable()}, asked after each
    L{write}: back-pressure for a store that hands data on asynchronously.

        @return: C{None} while the store can take more at once, else a
            Deferred that fires once it has caught up.

    The server reads nothing more from the client until then, so a client
    faster than the store costs bounded memory rather than the message.
    A store without it is never asked (it is not declared below).
    """

    queue_id = Attribute("The queue id, known from the start so Received can name it.")

    def write(data):
        """
        Append bytes of the message.  May raise L{OSError} (a full disk): the
        server then refuses the message with 452 and calls L{abort}.
        """

    def commit(envelope):
        """
        Make the message and its envelope durable.

        @return: a Deferred that fires only when data and envelope are on stable
            storage (file and directory synced) and will survive a crash.  It
            fails with L{OSError} if that cannot be done; then nothing is kept.
            Committing twice, or an envelope with another queue id, is a
            programming error and fails with L{ValueError}.
        """

    def abort():
        """
        Throw the partial message away.  Safe to call at any time, twice.
        After a successful commit it does nothing: the message is queued and
        its 250 may already be on the wire.
        """


class IQueueStore(Interface):
    """
    Durable storage of queued messages: the only hand-off between receiving
    and delivering.

    A queue may hold millions of messages (an outage downstream, a hold for
    maintenance), so nothing here hands over the whole queue at once: the
    scheduler keeps a bounded set of messages in memory and asks L{scan} for
    the ones that fall due, L{load}ing each when it takes it.  Every message
    carries a due time: when it was committed, its arrival; after an
    L{update}, the earliest C{next_attempt} of its pending recipients.

    A store shared by several relays (the postgres store) also has optional
    methods, not declared below (stores without them still provide this
    interface, and the scheduler uses them exactly as before):

      - C{claim(queue_id)}: lease the message for this relay and make its
        data readable by L{openData} here.  @return: a Deferred firing with
        the envelope as stored (fresher than a copy in memory if another
        relay changed it), or C{None} if another live relay holds it or it
        is gone.  The scheduler claims before every attempt and every
        operator's command, and attempts nothing it could not claim;
        L{update} and L{remove} end the lease.  A lease not ended lapses
        after the store's own time unless the store renews it (it does for
        claims it holds), so a relay that dies loses its leases and another
        relay's L{scan} finds the messages.
      - C{unclaim(queue_id)}: end a claim that ends without an update or a
        removal (the attempt found the message held or due later).
      - C{listing(limit)}: a L{relay.envelope.QueueScan} of every queued
        message, whichever relay holds it, for the operator's listing; a
        shared store's L{scan} leaves out what another live relay holds.
      - C{leaseOwner(queue_id)}: a Deferred of the name of the relay holding
        a live lease on it, or C{None}: named when an operator's command
        gives up waiting for it.
      - C{rescanWithin}: an attribute, seconds: the scheduler scans at least
        this often.  Another relay may take leases after a scan and die
        holding them; whatever the last scan saw, its mail is then found
        within this time of its leases' end, not at the next periodic
        rescan (minutes).
    """

    def recover():
        """
        Called once at start-up, before anything else, while the listeners
        may already accept (the messages of this run are left alone).

        Tidy what earlier runs left behind: uncommitted leftovers are
        discarded; a damaged message is set aside with a log line, never
        deleted silently.  It must not need to read every queued message.

        No client is answered until it has fired, so it should do only what
        must happen before the first 250, in a time that does not grow with
        the queue.

        @return: a Deferred firing with the number of committed messages in
            the queue if that costs nothing (a store in memory, a database
            that keeps it), or with C{None}: the scheduler's first L{scan}
            then counts it.  It fails if the queue cannot be used; start-up
            then stops, rather than accepting mail it may be unable to keep.
        """

    def scan(before, limit, exclude):
        """
        The messages that are due.

        @param before: a POSIX time: messages due at or before it.
        @param limit: at most this many.
        @param exclude: a collection of queue ids not to return (those the
            scheduler already holds).
        @return: a Deferred firing with a L{relay.envelope.QueueScan}: the
            due messages as C{(due, queue_id)} pairs, earliest first; the
            number of messages in the store; and the earliest due time of
            the messages left out for being due later or past C{limit}
            (C{None} if there are none), so that the caller knows when to
            scan again; optionally (C{oldest}) when the oldest message
            arrived, if the store can tell without reading messages.  Its cost may grow with the size of the queue: it
            runs off the reactor thread, and callers ask it sparingly.
        """

    def load(queue_id):
        """
        @return: a Deferred firing with the stored L{relay.envelope.Envelope}
            of a committed message, with the recipient states of its last
            L{update}.  It fails with L{FileNotFoundError} for an unknown (or
            removed) queue id, and with L{ValueError} for a message found
            damaged (which the store sets aside with a log line).
        """

    def begin():
        """Start receiving a message. @return: an L{IIncomingMessage}."""

    def openData(queue_id):
        """
        @return: a new binary file reading the committed message data (the
            data alone, from its first octet to its last), to be read a
            block at a time.
        @raise OSError: (L{FileNotFoundError}) for an unknown queue id.
        """

    def update(envelope):
        """
        Replace the stored state of a message atomically: its recipients'
        states, its C{extra}, and with them its due time.  The data and the
        rest of the envelope never change after commit.

        @return: a Deferred that fires when the new state is durable; after
            a crash, a message has either its old state or its new one.  It
            fails with L{OSError} if that cannot be done: the old state
            stands, and the caller tries again later.
        """

    def remove(queue_id):
        """
        Forget a message whose recipients are all done.  @return: a Deferred
        firing once it is done; it need not be durable yet (a crash may bring
        the message back, to be delivered again, never lost).
        """

    def stop():
        """Release resources; may return a Deferred."""


class IQueueStoreFactory(IPluginFactory):
    def build(options, context):
        """
        Build a store.  C{options} holds C{path} (already resolved against
        C{state_dir}) and any keys of C{[queue]} that are not the queue's own.

        @raise relay.errors.OptionError: a key has a bad value.
        @return: an L{IQueueStore}.
        """
