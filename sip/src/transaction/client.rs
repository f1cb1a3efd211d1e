//! Client transactions: RFC 3261 17.1.1 (INVITE, with RFC 6026's Accepted state) and 17.1.2
//! (non-INVITE).

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::{after, earliest, next_due, Due, Retransmit, State, TimerConfig};

/// What the TU must do with a response it just handed to [`ClientTransaction::handle_response`].
/// The transaction decides this because only it knows whether the response is new or a
/// retransmission it already dealt with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseAction {
    /// Pass the response to the TU: a provisional, the first final of a non-INVITE, a 2xx to an
    /// INVITE, or a 2xx retransmission while Accepted (RFC 6026: the proxy must forward those
    /// upstream because the UAS, not the transaction, retransmits 2xx).
    Forward,
    /// The first non-2xx final of an INVITE: the TU forwards it and must build the hop-by-hop
    /// ACK (RFC 3261 17.1.1.3) and give it to [`ClientTransaction::set_ack`]. The ACK is built
    /// by the TU because it needs header values from the request and response.
    ForwardAndAck,
    /// The transaction handled it (a retransmitted final, with the ACK re-sent if needed) or it
    /// is late or stray for the current state. The TU must not forward it.
    Absorb,
}

/// What a client transaction tells its TU, pulled with [`ClientTransaction::poll_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// Timer B or F fired before a final response: the TU should act as if a 408 Request
    /// Timeout had been received (RFC 3261 16.7 / 8.1.3.1).
    Timeout,
    /// The transport could not deliver the request before a final response arrived
    /// (RFC 3261 17.1.4): a proxy treats this like a 503 on the branch (RFC 3261 16.9). Not
    /// reported once a final response was received, so the TU never sees a second outcome for a
    /// branch it already has an answer for.
    TransportError,
    /// The transaction is finished: remove it from the table. Reported exactly once, always
    /// last.
    Terminated,
}

/// One client transaction: the proxy's side of one forwarded request on one branch.
///
/// The transaction retransmits the request over unreliable transports, times it out, absorbs
/// retransmitted finals (re-sending the ACK for INVITE non-2xx finals), and keeps an accepted
/// INVITE around so 2xx retransmissions are still recognised as belonging to it (RFC 6026).
#[derive(Debug)]
pub struct ClientTransaction {
    invite: bool,
    reliable: bool,
    cfg: TimerConfig,
    state: State,
    /// The request, kept while it may need retransmitting. Released once a final arrives.
    request: Bytes,
    /// The ACK for a non-2xx final, re-sent on every retransmission of that final (INVITE,
    /// Completed).
    ack: Option<Bytes>,
    /// True between returning [`ResponseAction::ForwardAndAck`] and the TU calling `set_ack`:
    /// only that first ACK is accepted.
    ack_wanted: bool,
    got_provisional: bool,
    /// Timer A (INVITE) or E (non-INVITE); unreliable transports only.
    retransmit: Option<Retransmit>,
    /// Timer B (INVITE, Calling only) or F (non-INVITE, Trying and Proceeding).
    timeout: Option<Instant>,
    /// Timer D (INVITE Completed), M (INVITE Accepted) or K (non-INVITE Completed).
    linger: Option<Instant>,
    transmits: VecDeque<Bytes>,
    events: VecDeque<ClientEvent>,
}

impl ClientTransaction {
    /// Starts a client transaction for `request` (its exact bytes). The first transmission is
    /// queued, not sent, so the caller has a single send path: `poll_transmit`. `reliable` is
    /// the transport the request goes out on; it decides whether the transaction retransmits
    /// (only over UDP) and whether the lingering states last or end at once.
    pub fn new(
        invite: bool,
        reliable: bool,
        request: Bytes,
        now: Instant,
        cfg: TimerConfig,
    ) -> Self {
        let retransmit = if reliable {
            None
        } else {
            Retransmit::start(now, cfg.t1)
        };
        let mut transmits = VecDeque::with_capacity(1);
        transmits.push_back(request.clone());
        ClientTransaction {
            invite,
            reliable,
            cfg,
            state: if invite {
                State::Calling
            } else {
                State::Trying
            },
            request,
            ack: None,
            ack_wanted: false,
            got_provisional: false,
            retransmit,
            timeout: after(now, cfg.t1x64()),
            linger: None,
            transmits,
            events: VecDeque::new(),
        }
    }

    /// A response matched to this transaction arrived with `status`. Drives the state machine
    /// and tells the TU whether to forward it. Status codes outside 100..=699 are not valid SIP
    /// responses and are absorbed without changing state.
    pub fn handle_response(&mut self, status: u16, now: Instant) -> ResponseAction {
        if !(100..=699).contains(&status) {
            return ResponseAction::Absorb;
        }
        let provisional = status < 200;
        let success = (200..300).contains(&status);
        if self.invite {
            match self.state {
                State::Calling | State::Proceeding if provisional => {
                    // RFC 3261 17.1.1.2: no more retransmissions, and no timer in Proceeding
                    // (the proxy's Timer C bounds it).
                    self.state = State::Proceeding;
                    self.got_provisional = true;
                    self.retransmit = None;
                    self.timeout = None;
                    ResponseAction::Forward
                }
                State::Calling | State::Proceeding if success => {
                    // RFC 6026 7.2: Accepted, Timer M, so 2xx retransmissions still match.
                    self.state = State::Accepted;
                    self.stop_request();
                    self.linger = after(now, self.cfg.t1x64());
                    ResponseAction::Forward
                }
                State::Calling | State::Proceeding => {
                    self.state = State::Completed;
                    self.stop_request();
                    self.ack_wanted = true;
                    if self.reliable {
                        // Timer D is 0: nothing will be retransmitted to absorb. The TU still
                        // gets to hand over the ACK (set_ack works in this state).
                        self.finish();
                    } else {
                        self.linger = after(now, self.cfg.timer_d());
                    }
                    ResponseAction::ForwardAndAck
                }
                State::Completed if !provisional && !success => {
                    // The server did not see our ACK and retransmitted its final.
                    if let Some(ack) = &self.ack {
                        self.transmits.push_back(ack.clone());
                    }
                    ResponseAction::Absorb
                }
                State::Accepted if success => ResponseAction::Forward,
                _ => ResponseAction::Absorb,
            }
        } else {
            match self.state {
                State::Trying | State::Proceeding if provisional => {
                    // Timer E keeps running; it is re-armed with T2 when it next fires.
                    self.state = State::Proceeding;
                    self.got_provisional = true;
                    ResponseAction::Forward
                }
                State::Trying | State::Proceeding => {
                    self.state = State::Completed;
                    self.stop_request();
                    if self.reliable {
                        // Timer K is 0 on reliable transports.
                        self.finish();
                    } else {
                        self.linger = after(now, self.cfg.t4);
                    }
                    ResponseAction::Forward
                }
                _ => ResponseAction::Absorb,
            }
        }
    }

    /// Hands over the ACK for the non-2xx final that [`handle_response`] answered with
    /// [`ResponseAction::ForwardAndAck`]. It is queued for transmission at once and kept for
    /// re-sending on each retransmitted final while Completed. On a reliable transport the
    /// transaction is already Terminated at this point (Timer D = 0) and the ACK is still sent
    /// once, so the caller must drain `poll_transmit` after this call before dropping the
    /// transaction. Ignored if no ACK is due (never asked for, already set, or the transaction
    /// ended by timer, transport error or `terminate`).
    ///
    /// [`handle_response`]: ClientTransaction::handle_response
    pub fn set_ack(&mut self, ack: Bytes) {
        if !self.ack_wanted {
            return;
        }
        self.ack_wanted = false;
        if self.state == State::Completed {
            self.ack = Some(ack.clone());
        }
        self.transmits.push_back(ack);
    }

    /// Runs every timer due at `now`, earliest first. A transaction that times out at the same
    /// instant a retransmission is due does not send it.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(due) = next_due(now, self.timeout, self.linger, self.retransmit) {
            match due {
                Due::Timeout => {
                    // Timer B or F: no final response in 64*T1.
                    self.events.push_back(ClientEvent::Timeout);
                    self.abort();
                }
                Due::Linger => {
                    // Timer D, K or M: done absorbing retransmissions.
                    self.ack_wanted = false;
                    self.finish();
                }
                Due::Retransmit => self.retransmit_request(now),
            }
        }
    }

    /// The transport reported that it could not deliver (ICMP unreachable, connection refused
    /// or reset). RFC 3261 17.1.4: go straight to Terminated. The TU gets
    /// [`ClientEvent::TransportError`] only if it is still waiting for a final response; after
    /// one (e.g. the ACK could not be sent) there is nothing left for it to decide.
    pub fn handle_transport_error(&mut self) {
        if self.state == State::Terminated {
            return;
        }
        if self.awaiting_final() {
            self.events.push_back(ClientEvent::TransportError);
        }
        self.abort();
    }

    /// The TU gives up on this transaction (e.g. proxy Timer C fired and the CANCEL got no
    /// answer). Terminates without a Timeout or TransportError event and drops anything still
    /// queued for transmission; only [`ClientEvent::Terminated`] is reported, so removal from
    /// the table follows the same path as every other ending.
    pub fn terminate(&mut self) {
        if self.state != State::Terminated {
            self.abort();
        }
    }

    /// Next message to put on the wire: the request, a retransmission of it, or an ACK.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.transmits.pop_front()
    }

    /// Next event for the TU.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// The earliest instant at which `handle_timeout` must be called, or `None` if no timer is
    /// running (Proceeding of an INVITE, where the proxy's Timer C rules, or Terminated).
    pub fn poll_timeout(&self) -> Option<Instant> {
        earliest(
            earliest(self.timeout, self.linger),
            self.retransmit.map(|r| r.at),
        )
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_invite(&self) -> bool {
        self.invite
    }

    /// True once any provisional (1xx) was received. RFC 3261 9.1: a CANCEL must not be sent
    /// before that, because it could overtake the INVITE and leave the callee ringing.
    pub fn got_provisional(&self) -> bool {
        self.got_provisional
    }

    /// Whether the TU is still waiting for this branch's outcome (no final response yet).
    fn awaiting_final(&self) -> bool {
        matches!(
            self.state,
            State::Calling | State::Trying | State::Proceeding
        )
    }

    /// Timer A or E fired: retransmit and re-arm. A doubles without bound (INVITE, only in
    /// Calling); E doubles up to T2 in Trying and is T2 flat in Proceeding (RFC 3261 17.1.2.2).
    fn retransmit_request(&mut self, now: Instant) {
        let Some(r) = self.retransmit else {
            return;
        };
        self.transmits.push_back(self.request.clone());
        let next = if self.invite {
            r.interval.saturating_mul(2)
        } else if self.state == State::Proceeding {
            self.cfg.t2
        } else {
            r.interval.saturating_mul(2).min(self.cfg.t2)
        };
        self.retransmit = r.rearm(now, next);
    }

    /// The request will never be sent again: stop its timers and release its buffer.
    fn stop_request(&mut self) {
        self.retransmit = None;
        self.timeout = None;
        self.request = Bytes::new();
    }

    /// Ends abnormally (timeout, transport error, TU gave up): anything still queued is
    /// pointless or harmful to send now, and no ACK will be accepted.
    fn abort(&mut self) {
        self.transmits.clear();
        self.ack_wanted = false;
        self.finish();
    }

    /// Enters Terminated and reports it, exactly once.
    fn finish(&mut self) {
        if self.state == State::Terminated {
            return;
        }
        self.state = State::Terminated;
        self.retransmit = None;
        self.timeout = None;
        self.linger = None;
        self.request = Bytes::new();
        self.ack = None;
        self.events.push_back(ClientEvent::Terminated);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{drain, ms, run_until};
    use super::*;
    use std::time::Duration;

    const REQ: &[u8] = b"REQUEST";
    const ACK: &[u8] = b"ACK";

    fn client(invite: bool, reliable: bool, base: Instant) -> ClientTransaction {
        client_cfg(invite, reliable, base, TimerConfig::default())
    }

    fn client_cfg(
        invite: bool,
        reliable: bool,
        base: Instant,
        cfg: TimerConfig,
    ) -> ClientTransaction {
        let mut tx = ClientTransaction::new(invite, reliable, Bytes::from_static(REQ), base, cfg);
        // The first transmission is always there and is the request itself.
        assert_eq!(tx.poll_transmit(), Some(Bytes::from_static(REQ)));
        assert_eq!(tx.poll_transmit(), None);
        tx
    }

    fn events(tx: &mut ClientTransaction) -> Vec<ClientEvent> {
        std::iter::from_fn(|| tx.poll_event()).collect()
    }

    /// Pokes a terminated transaction with every input and checks nothing more comes out.
    fn assert_inert(tx: &mut ClientTransaction, now: Instant) {
        assert_eq!(tx.state(), State::Terminated);
        assert_eq!(tx.poll_timeout(), None);
        tx.handle_timeout(now + Duration::from_secs(3600));
        tx.handle_transport_error();
        tx.terminate();
        for status in [100, 180, 200, 486] {
            assert_eq!(tx.handle_response(status, now), ResponseAction::Absorb);
        }
        tx.set_ack(Bytes::from_static(ACK));
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(tx.poll_event(), None);
        assert_eq!(tx.state(), State::Terminated);
    }

    // ---- INVITE client (RFC 3261 17.1.1, RFC 6026 7.2) ----

    #[test]
    fn invite_udp_timer_a_doubles_until_timer_b() {
        // Timer A: first at T1, then 2T1, 4T1, ... (no T2 cap for INVITE). Copies at
        // 0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s; the next would be 63.5 s but Timer B = 64*T1
        // = 32 s ends the transaction first.
        let base = Instant::now();
        let mut tx = client(true, false, base);
        assert_eq!(tx.state(), State::Calling);
        assert_eq!(tx.poll_timeout(), Some(base + ms(500)));
        let sent = run_until(&mut tx, base, Duration::from_secs(100));
        assert_eq!(sent, vec![500, 1500, 3500, 7500, 15500, 31500]);
        assert_eq!(1 + sent.len(), 7, "total copies including the first");
        assert_eq!(
            events(&mut tx),
            vec![ClientEvent::Timeout, ClientEvent::Terminated]
        );
        assert_inert(&mut tx, base + ms(32000));
    }

    #[test]
    fn invite_timer_b_fires_at_64_t1() {
        let base = Instant::now();
        let mut tx = client(true, false, base);
        tx.handle_timeout(base + ms(31999));
        drain(&mut tx);
        assert_eq!(tx.state(), State::Calling);
        assert_eq!(tx.poll_event(), None);
        assert_eq!(tx.poll_timeout(), Some(base + ms(32000)));
        tx.handle_timeout(base + ms(32000));
        assert_eq!(
            events(&mut tx),
            vec![ClientEvent::Timeout, ClientEvent::Terminated]
        );
        assert_eq!(tx.poll_transmit(), None);
    }

    #[test]
    fn invite_timer_a_is_not_capped_at_t2() {
        // T1 = 1 s, T2 = 4 s: intervals 1, 2, 4, 8, 16, 32 s -> copies at 0, 1, 3, 7, 15, 31, 63 s
        // and Timer B at 64 s. A non-INVITE would cap at 4 s.
        let base = Instant::now();
        let cfg = TimerConfig {
            t1: Duration::from_secs(1),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        };
        let mut tx = client_cfg(true, false, base, cfg);
        let sent = run_until(&mut tx, base, Duration::from_secs(63));
        assert_eq!(sent, vec![1000, 3000, 7000, 15000, 31000, 63000]);
        assert_eq!(tx.poll_timeout(), Some(base + ms(64000)));
        assert_eq!(tx.poll_event(), None);
        run_until(&mut tx, base, Duration::from_secs(64));
        assert_eq!(
            events(&mut tx),
            vec![ClientEvent::Timeout, ClientEvent::Terminated]
        );
    }

    #[test]
    fn invite_reliable_never_retransmits_and_times_out_with_timer_b() {
        let base = Instant::now();
        let mut tx = client(true, true, base);
        assert_eq!(tx.poll_timeout(), Some(base + ms(32000)));
        let sent = run_until(&mut tx, base, Duration::from_secs(100));
        assert!(
            sent.is_empty(),
            "retransmitted over a reliable transport: {sent:?}"
        );
        assert_eq!(
            events(&mut tx),
            vec![ClientEvent::Timeout, ClientEvent::Terminated]
        );
    }

    #[test]
    fn invite_provisional_stops_timers_a_and_b() {
        let base = Instant::now();
        let mut tx = client(true, false, base);
        assert!(!tx.got_provisional());
        tx.handle_timeout(base + ms(500));
        assert_eq!(drain(&mut tx), 1);
        assert_eq!(
            tx.handle_response(100, base + ms(700)),
            ResponseAction::Forward
        );
        assert_eq!(tx.state(), State::Proceeding);
        assert!(tx.got_provisional());
        assert_eq!(
            tx.poll_timeout(),
            None,
            "no timer in Proceeding; Timer C is the proxy's"
        );
        assert_eq!(
            tx.handle_response(180, base + ms(900)),
            ResponseAction::Forward
        );
        assert_eq!(
            tx.handle_response(183, base + ms(900)),
            ResponseAction::Forward
        );
        tx.handle_timeout(base + Duration::from_secs(600));
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(tx.poll_event(), None);
        assert_eq!(tx.state(), State::Proceeding);
    }

    #[test]
    fn invite_2xx_enters_accepted_and_forwards_retransmissions_until_timer_m() {
        for reliable in [false, true] {
            let base = Instant::now();
            let mut tx = client(true, reliable, base);
            assert_eq!(
                tx.handle_response(180, base + ms(100)),
                ResponseAction::Forward
            );
            assert_eq!(
                tx.handle_response(200, base + ms(1000)),
                ResponseAction::Forward
            );
            assert_eq!(tx.state(), State::Accepted);
            // Timer M = 64*T1 on every transport (RFC 6026).
            assert_eq!(tx.poll_timeout(), Some(base + ms(33000)));
            // 2xx retransmissions (and 2xx from other forks) go to the TU; nothing else does,
            // and the transaction never ACKs a 2xx.
            assert_eq!(
                tx.handle_response(200, base + ms(1500)),
                ResponseAction::Forward
            );
            assert_eq!(
                tx.handle_response(202, base + ms(1600)),
                ResponseAction::Forward
            );
            assert_eq!(
                tx.handle_response(180, base + ms(1700)),
                ResponseAction::Absorb
            );
            assert_eq!(
                tx.handle_response(486, base + ms(1800)),
                ResponseAction::Absorb
            );
            tx.set_ack(Bytes::from_static(ACK));
            let sent = run_until(&mut tx, base, ms(32999));
            assert!(sent.is_empty());
            assert_eq!(tx.state(), State::Accepted);
            assert_eq!(
                tx.handle_response(200, base + ms(32999)),
                ResponseAction::Forward
            );
            run_until(&mut tx, base, ms(33000));
            assert_eq!(events(&mut tx), vec![ClientEvent::Terminated]);
            assert_eq!(tx.poll_transmit(), None);
            assert_inert(&mut tx, base + ms(33000));
        }
    }

    #[test]
    fn invite_2xx_in_calling_stops_retransmissions() {
        let base = Instant::now();
        let mut tx = client(true, false, base);
        assert_eq!(
            tx.handle_response(200, base + ms(200)),
            ResponseAction::Forward
        );
        assert!(!tx.got_provisional());
        let sent = run_until(&mut tx, base, Duration::from_secs(100));
        assert!(sent.is_empty());
        assert_eq!(events(&mut tx), vec![ClientEvent::Terminated]);
    }

    #[test]
    fn invite_non_2xx_udp_acks_absorbs_retransmissions_until_timer_d() {
        let base = Instant::now();
        let mut tx = client(true, false, base);
        let sent = run_until(&mut tx, base, ms(2000));
        assert_eq!(sent, vec![500, 1500]);
        assert_eq!(
            tx.handle_response(486, base + ms(2000)),
            ResponseAction::ForwardAndAck
        );
        assert_eq!(tx.state(), State::Completed);
        // Timer D: 32 s on unreliable transports.
        assert_eq!(tx.poll_timeout(), Some(base + ms(34000)));
        tx.set_ack(Bytes::from_static(ACK));
        assert_eq!(tx.poll_transmit(), Some(Bytes::from_static(ACK)));
        assert_eq!(tx.poll_transmit(), None);
        // Only the first set_ack counts.
        tx.set_ack(Bytes::from_static(b"OTHER"));
        assert_eq!(tx.poll_transmit(), None);

        // Each retransmitted final is absorbed and answered with the same ACK.
        for t in [2500, 3500, 5500] {
            assert_eq!(
                tx.handle_response(486, base + ms(t)),
                ResponseAction::Absorb
            );
            assert_eq!(tx.poll_transmit(), Some(Bytes::from_static(ACK)));
            assert_eq!(tx.poll_transmit(), None);
        }
        // Late provisionals and other finals are not forwarded and trigger no ACK.
        assert_eq!(
            tx.handle_response(180, base + ms(6000)),
            ResponseAction::Absorb
        );
        assert_eq!(
            tx.handle_response(200, base + ms(6000)),
            ResponseAction::Absorb
        );
        assert_eq!(tx.poll_transmit(), None);

        // No request retransmissions after the final; Timer D ends it quietly.
        let sent = run_until(&mut tx, base, ms(33999));
        assert!(sent.is_empty());
        assert_eq!(tx.state(), State::Completed);
        assert_eq!(tx.poll_event(), None);
        run_until(&mut tx, base, ms(34000));
        assert_eq!(events(&mut tx), vec![ClientEvent::Terminated]);
        assert_inert(&mut tx, base + ms(34000));
    }

    #[test]
    fn invite_retransmitted_final_before_set_ack_sends_nothing() {
        let base = Instant::now();
        let mut tx = client(true, false, base);
        assert_eq!(
            tx.handle_response(503, base + ms(100)),
            ResponseAction::ForwardAndAck
        );
        assert_eq!(
            tx.handle_response(503, base + ms(200)),
            ResponseAction::Absorb
        );
        assert_eq!(tx.poll_transmit(), None);
        tx.set_ack(Bytes::from_static(ACK));
        assert_eq!(drain(&mut tx), 1);
        assert_eq!(
            tx.handle_response(503, base + ms(300)),
            ResponseAction::Absorb
        );
        assert_eq!(drain(&mut tx), 1);
    }

    #[test]
    fn invite_set_ack_after_timer_d_is_ignored() {
        let base = Instant::now();
        let mut tx = client(true, false, base);
        assert_eq!(tx.handle_response(404, base), ResponseAction::ForwardAndAck);
        run_until(&mut tx, base, Duration::from_secs(32));
        assert_eq!(tx.state(), State::Terminated);
        tx.set_ack(Bytes::from_static(ACK));
        assert_eq!(tx.poll_transmit(), None);
    }

    #[test]
    fn invite_non_2xx_reliable_timer_d_is_zero_but_ack_is_still_sent() {
        let base = Instant::now();
        let mut tx = client(true, true, base);
        assert_eq!(
            tx.handle_response(100, base + ms(10)),
            ResponseAction::Forward
        );
        assert_eq!(
            tx.handle_response(603, base + ms(20)),
            ResponseAction::ForwardAndAck
        );
        // Timer D = 0: Terminated within the same call.
        assert_eq!(tx.state(), State::Terminated);
        assert_eq!(tx.poll_timeout(), None);
        tx.set_ack(Bytes::from_static(ACK));
        assert_eq!(tx.poll_transmit(), Some(Bytes::from_static(ACK)));
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(events(&mut tx), vec![ClientEvent::Terminated]);
        // Nothing to re-send: a retransmitted final is just absorbed.
        assert_eq!(
            tx.handle_response(603, base + ms(30)),
            ResponseAction::Absorb
        );
        assert_inert(&mut tx, base + ms(30));
    }

    // ---- non-INVITE client (RFC 3261 17.1.2) ----

    #[test]
    fn non_invite_udp_sends_11_copies_before_timer_f() {
        // Timer E: T1, 2T1, 4T1, then capped at T2 = 4 s. Copies at
        // 0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5 s; Timer F at 32 s.
        let base = Instant::now();
        let mut tx = client(false, false, base);
        assert_eq!(tx.state(), State::Trying);
        let sent = run_until(&mut tx, base, Duration::from_secs(100));
        assert_eq!(
            sent,
            vec![500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500]
        );
        assert_eq!(1 + sent.len(), 11);
        assert_eq!(
            events(&mut tx),
            vec![ClientEvent::Timeout, ClientEvent::Terminated]
        );
        assert_inert(&mut tx, base + ms(32000));
    }

    #[test]
    fn non_invite_timer_f_fires_at_64_t1() {
        let base = Instant::now();
        let mut tx = client(false, false, base);
        run_until(&mut tx, base, ms(31999));
        assert_eq!(tx.poll_event(), None);
        assert_eq!(tx.poll_timeout(), Some(base + ms(32000)));
        run_until(&mut tx, base, ms(32000));
        assert_eq!(
            events(&mut tx),
            vec![ClientEvent::Timeout, ClientEvent::Terminated]
        );
    }

    #[test]
    fn non_invite_timer_e_is_t2_in_proceeding_and_timer_f_still_runs() {
        // Copies at 0 and 0.5 s in Trying; 1xx at 0.6 s; E (already armed for 1.5 s) fires in
        // Proceeding and is then re-armed with T2: 1.5, 5.5, 9.5, ..., 29.5 s. F at 32 s.
        let base = Instant::now();
        let mut tx = client(false, false, base);
        assert_eq!(run_until(&mut tx, base, ms(600)), vec![500]);
        assert_eq!(
            tx.handle_response(100, base + ms(600)),
            ResponseAction::Forward
        );
        assert_eq!(tx.state(), State::Proceeding);
        assert!(tx.got_provisional());
        let sent = run_until(&mut tx, base, Duration::from_secs(100));
        assert_eq!(
            sent,
            vec![1500, 5500, 9500, 13500, 17500, 21500, 25500, 29500]
        );
        assert_eq!(
            events(&mut tx),
            vec![ClientEvent::Timeout, ClientEvent::Terminated]
        );
    }

    #[test]
    fn non_invite_reliable_never_retransmits_and_times_out_with_timer_f() {
        let base = Instant::now();
        let mut tx = client(false, true, base);
        assert_eq!(tx.poll_timeout(), Some(base + ms(32000)));
        assert_eq!(
            tx.handle_response(100, base + ms(5)),
            ResponseAction::Forward
        );
        assert_eq!(tx.poll_timeout(), Some(base + ms(32000)));
        let sent = run_until(&mut tx, base, Duration::from_secs(100));
        assert!(sent.is_empty());
        assert_eq!(
            events(&mut tx),
            vec![ClientEvent::Timeout, ClientEvent::Terminated]
        );
    }

    #[test]
    fn non_invite_final_udp_absorbs_retransmissions_until_timer_k() {
        let base = Instant::now();
        let mut tx = client(false, false, base);
        assert_eq!(run_until(&mut tx, base, ms(1000)), vec![500]);
        assert_eq!(
            tx.handle_response(200, base + ms(1000)),
            ResponseAction::Forward
        );
        assert_eq!(tx.state(), State::Completed);
        // Timer K = T4 = 5 s.
        assert_eq!(tx.poll_timeout(), Some(base + ms(6000)));
        assert_eq!(
            tx.handle_response(200, base + ms(2000)),
            ResponseAction::Absorb
        );
        assert_eq!(
            tx.handle_response(100, base + ms(2000)),
            ResponseAction::Absorb
        );
        assert_eq!(
            tx.handle_response(500, base + ms(2000)),
            ResponseAction::Absorb
        );
        assert_eq!(tx.poll_transmit(), None);
        let sent = run_until(&mut tx, base, ms(5999));
        assert!(
            sent.is_empty(),
            "no retransmission after the final: {sent:?}"
        );
        assert_eq!(tx.poll_event(), None);
        run_until(&mut tx, base, ms(6000));
        assert_eq!(events(&mut tx), vec![ClientEvent::Terminated]);
        assert_inert(&mut tx, base + ms(6000));
    }

    #[test]
    fn non_invite_final_from_proceeding() {
        let base = Instant::now();
        let mut tx = client(false, false, base);
        assert_eq!(
            tx.handle_response(180, base + ms(100)),
            ResponseAction::Forward
        );
        assert_eq!(
            tx.handle_response(481, base + ms(200)),
            ResponseAction::Forward
        );
        assert_eq!(tx.state(), State::Completed);
        assert_eq!(tx.poll_timeout(), Some(base + ms(5200)));
    }

    #[test]
    fn non_invite_final_reliable_timer_k_is_zero() {
        let base = Instant::now();
        let mut tx = client(false, true, base);
        assert_eq!(
            tx.handle_response(200, base + ms(50)),
            ResponseAction::Forward
        );
        assert_eq!(tx.state(), State::Terminated);
        assert_eq!(tx.poll_timeout(), None);
        assert_eq!(events(&mut tx), vec![ClientEvent::Terminated]);
        assert_inert(&mut tx, base + ms(50));
    }

    #[test]
    fn non_invite_set_ack_is_ignored() {
        let base = Instant::now();
        let mut tx = client(false, false, base);
        assert_eq!(tx.handle_response(404, base), ResponseAction::Forward);
        tx.set_ack(Bytes::from_static(ACK));
        assert_eq!(tx.poll_transmit(), None);
    }

    // ---- transport errors, terminate(), lateness, bad input ----

    #[test]
    fn transport_error_before_final_reports_and_terminates_once() {
        for (invite, reliable) in [(true, false), (true, true), (false, false), (false, true)] {
            let base = Instant::now();
            let mut tx = ClientTransaction::new(
                invite,
                reliable,
                Bytes::from_static(REQ),
                base,
                TimerConfig::default(),
            );
            // The request was never sent: it is dropped, not left in the queue.
            tx.handle_transport_error();
            assert_eq!(tx.state(), State::Terminated);
            assert_eq!(tx.poll_transmit(), None);
            assert_eq!(
                events(&mut tx),
                vec![ClientEvent::TransportError, ClientEvent::Terminated]
            );
            assert_inert(&mut tx, base);
        }
    }

    #[test]
    fn transport_error_in_proceeding_reports() {
        let base = Instant::now();
        let mut tx = client(true, true, base);
        assert_eq!(tx.handle_response(180, base), ResponseAction::Forward);
        tx.handle_transport_error();
        assert_eq!(
            events(&mut tx),
            vec![ClientEvent::TransportError, ClientEvent::Terminated]
        );
    }

    #[test]
    fn transport_error_after_final_terminates_quietly() {
        let base = Instant::now();
        let mut tx = client(true, false, base);
        assert_eq!(tx.handle_response(486, base), ResponseAction::ForwardAndAck);
        tx.handle_transport_error();
        // The ACK can no longer be sent.
        tx.set_ack(Bytes::from_static(ACK));
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(events(&mut tx), vec![ClientEvent::Terminated]);

        let mut tx = client(true, false, base);
        assert_eq!(tx.handle_response(200, base), ResponseAction::Forward);
        tx.handle_transport_error();
        assert_eq!(events(&mut tx), vec![ClientEvent::Terminated]);
        assert_inert(&mut tx, base);
    }

    #[test]
    fn terminate_is_quiet_and_drops_pending_transmissions() {
        let base = Instant::now();
        let mut tx = client(true, false, base);
        assert_eq!(
            tx.handle_response(180, base + ms(100)),
            ResponseAction::Forward
        );
        tx.terminate();
        assert_eq!(tx.state(), State::Terminated);
        assert_eq!(events(&mut tx), vec![ClientEvent::Terminated]);
        assert_inert(&mut tx, base + ms(100));

        // Queued retransmission is dropped too.
        let mut tx = client(false, false, base);
        tx.handle_timeout(base + ms(500));
        tx.terminate();
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(events(&mut tx), vec![ClientEvent::Terminated]);
    }

    #[test]
    fn late_timeout_call_sends_one_copy_not_a_burst() {
        let base = Instant::now();
        let mut tx = client(true, false, base);
        // A was due at 0.5, 1.5 and 3.5 s; a caller that wakes up only at 5 s gets one copy.
        tx.handle_timeout(base + ms(5000));
        assert_eq!(drain(&mut tx), 1);
        let next = tx.poll_timeout();
        assert!(next.is_some_and(|n| n > base + ms(5000)), "{next:?}");
        assert_eq!(tx.state(), State::Calling);
    }

    #[test]
    fn late_timeout_past_timer_b_sends_nothing() {
        let base = Instant::now();
        let mut tx = client(false, false, base);
        // Every E retransmission and F are overdue: only the timeout is reported, and no stale
        // retransmission of a request the TU now considers failed.
        tx.handle_timeout(base + Duration::from_secs(40));
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(
            events(&mut tx),
            vec![ClientEvent::Timeout, ClientEvent::Terminated]
        );
    }

    #[test]
    fn early_timeout_call_does_nothing() {
        let base = Instant::now();
        let mut tx = client(true, false, base);
        tx.handle_timeout(base + ms(499));
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(tx.poll_timeout(), Some(base + ms(500)));
    }

    #[test]
    fn invalid_status_codes_are_absorbed_without_state_change() {
        let base = Instant::now();
        for invite in [true, false] {
            let mut tx = client(invite, false, base);
            let before = tx.state();
            for status in [0, 99, 700, 999] {
                assert_eq!(tx.handle_response(status, base), ResponseAction::Absorb);
            }
            assert_eq!(tx.state(), before);
            assert!(!tx.got_provisional());
        }
    }

    #[test]
    fn is_invite_reports_kind() {
        let base = Instant::now();
        assert!(client(true, false, base).is_invite());
        assert!(!client(false, false, base).is_invite());
    }

    #[test]
    fn zero_t1_does_not_busy_loop() {
        let base = Instant::now();
        let cfg = TimerConfig {
            t1: Duration::ZERO,
            t2: Duration::ZERO,
            t4: Duration::ZERO,
        };
        let mut tx = client_cfg(false, false, base, cfg);
        // 64*0 = 0: Timer F is due at once and wins over the retransmission.
        tx.handle_timeout(base);
        assert_eq!(
            events(&mut tx),
            vec![ClientEvent::Timeout, ClientEvent::Terminated]
        );
        assert_eq!(tx.poll_transmit(), None);
    }
}
