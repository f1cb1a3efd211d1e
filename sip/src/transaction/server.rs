//! Server transactions: RFC 3261 17.2.1 (INVITE, with RFC 6026's Accepted state) and 17.2.2
//! (non-INVITE).

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::{after, earliest, next_due, Due, Retransmit, State, TimerConfig};

/// What a server transaction tells its TU, pulled with [`ServerTransaction::poll_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// Timer H fired: the non-2xx final of an INVITE was never ACKed (RFC 3261 17.2.1). The
    /// peer is unreachable or broken; the TU may log it or tear down related state.
    AckTimeout,
    /// The transport could not deliver a response (RFC 3261 17.2.4).
    TransportError,
    /// The transaction is finished: remove it from the table. Reported exactly once, always
    /// last.
    Terminated,
}

/// One server transaction: the proxy's side of one received request.
///
/// It exists so that request retransmissions are answered from here (with the last response)
/// instead of reaching the TU as new requests, so INVITE non-2xx finals are retransmitted until
/// ACKed over UDP, and so an accepted INVITE lingers long enough (RFC 6026 Timer L) that INVITE
/// retransmissions crossing the 2xx are absorbed rather than forwarded as a new call.
#[derive(Debug)]
pub struct ServerTransaction {
    invite: bool,
    reliable: bool,
    cfg: TimerConfig,
    state: State,
    /// The most recent response, kept while a request retransmission or Timer G may need it
    /// again (Proceeding and Completed).
    last_response: Option<Bytes>,
    last_status: Option<u16>,
    /// Timer G (INVITE Completed, unreliable transports only).
    retransmit: Option<Retransmit>,
    /// Timer H (INVITE Completed).
    timeout: Option<Instant>,
    /// Timer I (INVITE Confirmed), J (non-INVITE Completed) or L (INVITE Accepted).
    linger: Option<Instant>,
    transmits: VecDeque<Bytes>,
    events: VecDeque<ServerEvent>,
}

impl ServerTransaction {
    /// Creates the transaction for a request that just arrived over a `reliable` or unreliable
    /// transport. An INVITE starts in Proceeding and a non-INVITE in Trying (RFC 3261 Figures 7
    /// and 8). Nothing is sent: the TU decides whether and when to send 100 Trying.
    pub fn new(invite: bool, reliable: bool, now: Instant, cfg: TimerConfig) -> Self {
        // No timer runs until the TU responds; `now` is taken for symmetry with the client and
        // so a future request-side timer needs no API change.
        let _ = now;
        ServerTransaction {
            invite,
            reliable,
            cfg,
            state: if invite {
                State::Proceeding
            } else {
                State::Trying
            },
            last_response: None,
            last_status: None,
            retransmit: None,
            timeout: None,
            linger: None,
            transmits: VecDeque::with_capacity(1),
            events: VecDeque::new(),
        }
    }

    /// The TU sends a response (its exact bytes) through the transaction, which queues it and
    /// moves the state machine:
    /// - 1xx: sent; Proceeding.
    /// - INVITE 300-699: sent; Completed; Timer G (unreliable) retransmits it until the ACK,
    ///   Timer H gives up after 64*T1.
    /// - INVITE 2xx: sent; Accepted; Timer L = 64*T1. Further 2xx from the TU (the UAS's 2xx
    ///   retransmissions a proxy forwards, or 2xx from other forks) are sent as well.
    /// - non-INVITE 200-699: sent; Completed; Timer J = 64*T1 unreliable, 0 reliable (the
    ///   response is still queued even though the state is then Terminated).
    ///
    /// Returns false and sends nothing when the state forbids it (a second final, a provisional
    /// after a final, anything once Terminated) or `status` is not in 100..=699, because the
    /// RFC requires those to be discarded rather than put on the wire.
    pub fn send_response(&mut self, status: u16, response: Bytes, now: Instant) -> bool {
        if !(100..=699).contains(&status) {
            return false;
        }
        let provisional = status < 200;
        let success = (200..300).contains(&status);
        let open = if self.invite {
            self.state == State::Proceeding
        } else {
            matches!(self.state, State::Trying | State::Proceeding)
        };
        if open && provisional {
            self.state = State::Proceeding;
            self.send(status, response, true);
        } else if open && self.invite && success {
            // RFC 6026 7.1: Accepted; 2xx retransmissions are the TU's job, request
            // retransmissions are absorbed here.
            self.state = State::Accepted;
            self.linger = after(now, self.cfg.t1x64());
            self.send(status, response, false);
        } else if open && self.invite {
            self.state = State::Completed;
            if !self.reliable {
                self.retransmit = Retransmit::start(now, self.cfg.t1);
            }
            self.timeout = after(now, self.cfg.t1x64());
            self.send(status, response, true);
        } else if open {
            self.state = State::Completed;
            self.send(status, response, true);
            if self.reliable {
                // Timer J is 0: no request retransmissions to absorb on a reliable transport.
                self.finish();
            } else {
                self.linger = after(now, self.cfg.t1x64());
            }
        } else if self.state == State::Accepted && success {
            self.send(status, response, false);
        } else {
            return false;
        }
        true
    }

    /// Like a 2xx through [`ServerTransaction::send_response`], for an INVITE the TU answers
    /// as its UAS (the SBC answering a session refresh for a dead PBX), so it takes on the UAS
    /// core's duty of RFC 3261 13.3.1.4 that a proxy never has: on an unreliable transport
    /// the 2xx is retransmitted, T1 doubling up to T2, until
    /// [`ServerTransaction::handle_own_2xx_ack`] or Timer L (64*T1), and a retransmitted
    /// INVITE gets it again. A proxied 2xx needs none of that (its UAS retransmits it), but
    /// this one follows our 100 Trying: lost once, the caller would wait out Timer B, and a
    /// UA whose re-INVITE times out ends the call (RFC 3261 14.1).
    ///
    /// Returns false and sends nothing unless this is an INVITE still in Proceeding and
    /// `status` is a 2xx.
    pub fn send_own_2xx(&mut self, status: u16, response: Bytes, now: Instant) -> bool {
        if !self.invite || !(200..300).contains(&status) || self.state != State::Proceeding {
            return false;
        }
        self.state = State::Accepted;
        self.linger = after(now, self.cfg.t1x64());
        if !self.reliable {
            self.retransmit = Retransmit::start(now, self.cfg.t1);
        }
        self.send(status, response, !self.reliable);
        true
    }

    /// The ACK for a 2xx sent with [`ServerTransaction::send_own_2xx`] arrived (matched by
    /// the TU: it has its own branch): retransmissions stop; the transaction lingers until
    /// Timer L still. Returns true when it was awaited, false for anything else (a repeated
    /// ACK, a proxied 2xx, another state).
    pub fn handle_own_2xx_ack(&mut self) -> bool {
        if self.state != State::Accepted || self.last_response.is_none() {
            return false;
        }
        self.retransmit = None;
        self.last_response = None;
        true
    }

    /// Whether a retransmission timer runs (Timer G, or an own 2xx's), so a caller that
    /// rounds timers knows to keep this one exact.
    pub fn retransmitting(&self) -> bool {
        self.retransmit.is_some()
    }

    /// A retransmission of the original request arrived. In Proceeding the last provisional
    /// (if any) and in Completed the final are re-sent, because the retransmission means the
    /// client did not get them; so is an own 2xx not yet ACKed (see
    /// [`ServerTransaction::send_own_2xx`]). In every other state it is absorbed: in Trying
    /// there is nothing to send yet, in Accepted a proxied 2xx is the TU's to retransmit, and
    /// in Confirmed the exchange is over. Either way the TU never sees it.
    pub fn handle_request_retransmit(&mut self, _now: Instant) {
        // In Accepted a response is kept only while an own 2xx awaits its ACK.
        if matches!(
            self.state,
            State::Proceeding | State::Completed | State::Accepted
        ) {
            if let Some(response) = &self.last_response {
                self.transmits.push_back(response.clone());
            }
        }
    }

    /// An ACK matched to this INVITE transaction arrived. In Completed it confirms the non-2xx
    /// final: retransmissions stop and the transaction lingers in Confirmed for Timer I (T4
    /// unreliable, 0 reliable) to absorb ACK retransmissions. Returns true when the ACK is
    /// absorbed here (every INVITE state but Accepted) and false when the TU must handle it:
    /// in Accepted, since RFC 6026 passes ACKs to the TU there, and for a non-INVITE
    /// transaction, which an ACK can never belong to.
    pub fn handle_ack(&mut self, now: Instant) -> bool {
        if !self.invite {
            return false;
        }
        match self.state {
            State::Completed => {
                self.state = State::Confirmed;
                self.retransmit = None;
                self.timeout = None;
                self.last_response = None;
                if self.reliable {
                    self.finish();
                } else {
                    self.linger = after(now, self.cfg.t4);
                }
                true
            }
            State::Accepted => false,
            _ => true,
        }
    }

    /// Runs every timer due at `now`, earliest first. If Timer H is due at the same instant as
    /// a Timer G retransmission, the transaction ends without sending it.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(due) = next_due(now, self.timeout, self.linger, self.retransmit) {
            match due {
                Due::Timeout => {
                    // Timer H: the final was never ACKed.
                    self.events.push_back(ServerEvent::AckTimeout);
                    self.abort();
                }
                Due::Linger => self.finish(),
                Due::Retransmit => self.retransmit_response(now),
            }
        }
    }

    /// The transport could not deliver a response (RFC 3261 17.2.4): report it and terminate,
    /// dropping anything still queued since it would fail the same way.
    pub fn handle_transport_error(&mut self) {
        if self.state == State::Terminated {
            return;
        }
        self.events.push_back(ServerEvent::TransportError);
        self.abort();
    }

    /// Next response (or retransmission of one) to put on the wire.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.transmits.pop_front()
    }

    /// Next event for the TU.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// The earliest instant at which `handle_timeout` must be called, or `None` while the
    /// transaction waits for the TU (Trying, Proceeding) or is Terminated.
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

    /// Status of the last response sent through the transaction; lets the proxy know whether
    /// a final was already sent (e.g. before answering a CANCEL with 487).
    pub fn last_status(&self) -> Option<u16> {
        self.last_status
    }

    /// Queues a response; `keep` when request retransmissions or Timer G may need it again.
    fn send(&mut self, status: u16, response: Bytes, keep: bool) {
        self.last_status = Some(status);
        self.last_response = if keep { Some(response.clone()) } else { None };
        self.transmits.push_back(response);
    }

    /// Timer G fired: retransmit the final, doubling the interval up to T2 (RFC 3261 17.2.1).
    fn retransmit_response(&mut self, now: Instant) {
        let Some(r) = self.retransmit else {
            return;
        };
        if let Some(response) = &self.last_response {
            self.transmits.push_back(response.clone());
        }
        self.retransmit = r.rearm(now, r.interval.saturating_mul(2).min(self.cfg.t2));
    }

    /// Ends abnormally (Timer H, transport error): anything still queued is pointless to send.
    fn abort(&mut self) {
        self.transmits.clear();
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
        self.last_response = None;
        self.events.push_back(ServerEvent::Terminated);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{drain, ms, run_until};
    use super::*;
    use std::time::Duration;

    fn server(invite: bool, reliable: bool, base: Instant) -> ServerTransaction {
        let tx = ServerTransaction::new(invite, reliable, base, TimerConfig::default());
        assert_eq!(tx.poll_timeout(), None);
        tx
    }

    fn resp(status: u16) -> Bytes {
        Bytes::from(format!("SIP/2.0 {status} X"))
    }

    fn events(tx: &mut ServerTransaction) -> Vec<ServerEvent> {
        std::iter::from_fn(|| tx.poll_event()).collect()
    }

    fn transmits(tx: &mut ServerTransaction) -> Vec<Bytes> {
        std::iter::from_fn(|| tx.poll_transmit()).collect()
    }

    /// Pokes a terminated transaction with every input and checks nothing more comes out.
    fn assert_inert(tx: &mut ServerTransaction, now: Instant) {
        assert_eq!(tx.state(), State::Terminated);
        assert_eq!(tx.poll_timeout(), None);
        tx.handle_timeout(now + Duration::from_secs(3600));
        tx.handle_transport_error();
        tx.handle_request_retransmit(now);
        for status in [100, 200, 486] {
            assert!(!tx.send_response(status, resp(status), now));
        }
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(tx.poll_event(), None);
        assert_eq!(tx.state(), State::Terminated);
    }

    // ---- INVITE server (RFC 3261 17.2.1, RFC 6026 7.1) ----

    #[test]
    fn invite_udp_timer_g_caps_at_t2_until_timer_h() {
        // Final sent at 1 s. Timer G: T1, then min(2T1, T2), doubling up to T2 = 4 s:
        // copies at 1, 1.5, 2.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5, 32.5 s. Timer H =
        // 64*T1 after the final = 33 s (the next G, 36.5 s, never fires).
        let base = Instant::now();
        let mut tx = server(true, false, base);
        assert_eq!(tx.state(), State::Proceeding);
        assert!(tx.send_response(100, resp(100), base));
        assert_eq!(transmits(&mut tx), vec![resp(100)]);
        assert_eq!(tx.poll_timeout(), None);
        assert!(tx.send_response(486, resp(486), base + ms(1000)));
        assert_eq!(tx.state(), State::Completed);
        assert_eq!(transmits(&mut tx), vec![resp(486)]);
        assert_eq!(tx.poll_timeout(), Some(base + ms(1500)));
        let sent = run_until(&mut tx, base, Duration::from_secs(100));
        assert_eq!(
            sent,
            vec![1500, 2500, 4500, 8500, 12500, 16500, 20500, 24500, 28500, 32500]
        );
        assert_eq!(1 + sent.len(), 11);
        assert_eq!(
            events(&mut tx),
            vec![ServerEvent::AckTimeout, ServerEvent::Terminated]
        );
        assert_eq!(tx.last_status(), Some(486));
        assert_inert(&mut tx, base + ms(33000));
    }

    #[test]
    fn invite_timer_g_retransmits_the_final_bytes() {
        let base = Instant::now();
        let mut tx = server(true, false, base);
        assert!(tx.send_response(480, resp(480), base));
        assert_eq!(drain(&mut tx), 1);
        tx.handle_timeout(base + ms(500));
        assert_eq!(transmits(&mut tx), vec![resp(480)]);
    }

    #[test]
    fn invite_reliable_no_timer_g_and_timer_h_at_64_t1() {
        let base = Instant::now();
        let mut tx = server(true, true, base);
        assert!(tx.send_response(404, resp(404), base));
        assert_eq!(drain(&mut tx), 1);
        assert_eq!(tx.poll_timeout(), Some(base + ms(32000)));
        let sent = run_until(&mut tx, base, ms(31999));
        assert!(
            sent.is_empty(),
            "retransmitted over a reliable transport: {sent:?}"
        );
        assert_eq!(tx.poll_event(), None);
        let sent = run_until(&mut tx, base, ms(32000));
        assert!(sent.is_empty());
        assert_eq!(
            events(&mut tx),
            vec![ServerEvent::AckTimeout, ServerEvent::Terminated]
        );
    }

    #[test]
    fn invite_ack_confirms_and_timer_i_ends_it_udp() {
        let base = Instant::now();
        let mut tx = server(true, false, base);
        assert!(tx.send_response(486, resp(486), base));
        assert_eq!(drain(&mut tx), 1);
        assert_eq!(run_until(&mut tx, base, ms(1000)), vec![500]);
        assert!(tx.handle_ack(base + ms(1000)));
        assert_eq!(tx.state(), State::Confirmed);
        // Timer I = T4 = 5 s; G and H are gone.
        assert_eq!(tx.poll_timeout(), Some(base + ms(6000)));
        // ACK and INVITE retransmissions are absorbed silently.
        assert!(tx.handle_ack(base + ms(1500)));
        tx.handle_request_retransmit(base + ms(1500));
        assert_eq!(tx.poll_transmit(), None);
        assert!(!tx.send_response(500, resp(500), base + ms(1500)));
        let sent = run_until(&mut tx, base, ms(5999));
        assert!(sent.is_empty());
        assert_eq!(tx.state(), State::Confirmed);
        run_until(&mut tx, base, ms(6000));
        assert_eq!(events(&mut tx), vec![ServerEvent::Terminated]);
        assert_inert(&mut tx, base + ms(6000));
    }

    #[test]
    fn invite_ack_reliable_timer_i_is_zero() {
        let base = Instant::now();
        let mut tx = server(true, true, base);
        assert!(tx.send_response(486, resp(486), base));
        drain(&mut tx);
        assert!(tx.handle_ack(base + ms(100)));
        assert_eq!(tx.state(), State::Terminated);
        assert_eq!(tx.poll_timeout(), None);
        assert_eq!(events(&mut tx), vec![ServerEvent::Terminated]);
        assert_inert(&mut tx, base + ms(100));
    }

    #[test]
    fn invite_2xx_accepted_until_timer_l() {
        for reliable in [false, true] {
            let base = Instant::now();
            let mut tx = server(true, reliable, base);
            assert!(tx.send_response(180, resp(180), base));
            assert!(tx.send_response(200, resp(200), base + ms(2000)));
            assert_eq!(tx.state(), State::Accepted);
            assert_eq!(transmits(&mut tx), vec![resp(180), resp(200)]);
            // Timer L = 64*T1 on every transport (RFC 6026).
            assert_eq!(tx.poll_timeout(), Some(base + ms(34000)));
            // INVITE retransmissions are absorbed: the 2xx is the TU's to retransmit.
            tx.handle_request_retransmit(base + ms(2500));
            assert_eq!(tx.poll_transmit(), None);
            // 2xx retransmissions forwarded by the proxy go out; nothing else does.
            assert!(tx.send_response(200, resp(200), base + ms(2500)));
            assert_eq!(transmits(&mut tx), vec![resp(200)]);
            assert!(!tx.send_response(183, resp(183), base + ms(2600)));
            assert!(!tx.send_response(486, resp(486), base + ms(2600)));
            assert_eq!(tx.poll_transmit(), None);
            // An ACK here is the TU's (RFC 6026).
            assert!(!tx.handle_ack(base + ms(2700)));
            assert_eq!(tx.state(), State::Accepted);
            let sent = run_until(&mut tx, base, ms(33999));
            assert!(
                sent.is_empty(),
                "the transaction never retransmits a 2xx: {sent:?}"
            );
            assert_eq!(tx.poll_event(), None);
            run_until(&mut tx, base, ms(34000));
            assert_eq!(events(&mut tx), vec![ServerEvent::Terminated]);
            assert_eq!(tx.last_status(), Some(200));
            assert_inert(&mut tx, base + ms(34000));
        }
    }

    #[test]
    fn own_2xx_is_retransmitted_until_its_ack_on_udp_only() {
        // 100 at 0, own 200 at 1 s: copies at 1.5, 2.5, 4.5, 8.5, 12.5 s (T1 doubling to T2);
        // a retransmitted INVITE gets it too; the ACK at 13 s stops it; Timer L at 33 s.
        let base = Instant::now();
        let mut tx = server(true, false, base);
        assert!(tx.send_response(100, resp(100), base));
        assert!(!tx.send_own_2xx(486, resp(486), base + ms(1000)));
        assert!(tx.send_own_2xx(200, resp(200), base + ms(1000)));
        assert_eq!(tx.state(), State::Accepted);
        assert!(tx.retransmitting());
        assert_eq!(transmits(&mut tx), vec![resp(100), resp(200)]);
        assert_eq!(tx.poll_timeout(), Some(base + ms(1500)));
        assert_eq!(
            run_until(&mut tx, base, ms(12999)),
            vec![1500, 2500, 4500, 8500, 12500]
        );
        tx.handle_request_retransmit(base + ms(12700));
        assert_eq!(transmits(&mut tx), vec![resp(200)]);
        // The ACK is the TU's to match (its own branch), and it tells the transaction once.
        assert!(!tx.handle_ack(base + ms(13000)));
        assert!(tx.handle_own_2xx_ack());
        assert!(!tx.handle_own_2xx_ack());
        assert!(!tx.retransmitting());
        tx.handle_request_retransmit(base + ms(13100));
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(run_until(&mut tx, base, ms(32999)), Vec::<u64>::new());
        assert_eq!(tx.poll_event(), None);
        run_until(&mut tx, base, ms(33000));
        assert_eq!(events(&mut tx), vec![ServerEvent::Terminated]);
        assert_inert(&mut tx, base + ms(33000));

        // Never ACKed: retransmitted up to Timer L, then terminated (no AckTimeout: a 2xx's
        // missing ACK is the TU's business).
        let mut tx = server(true, false, base);
        assert!(tx.send_own_2xx(200, resp(200), base));
        assert_eq!(drain(&mut tx), 1);
        let sent = run_until(&mut tx, base, ms(40000));
        assert_eq!(
            sent,
            vec![500, 1500, 3500, 7500, 11500, 15500, 19500, 23500, 27500, 31500]
        );
        assert_eq!(events(&mut tx), vec![ServerEvent::Terminated]);

        // TCP/TLS: sent once, nothing kept, the ACK finds nothing to stop.
        let mut tx = server(true, true, base);
        assert!(tx.send_own_2xx(200, resp(200), base));
        assert!(!tx.retransmitting());
        assert_eq!(transmits(&mut tx), vec![resp(200)]);
        tx.handle_request_retransmit(base + ms(10));
        assert_eq!(tx.poll_transmit(), None);
        assert!(!tx.handle_own_2xx_ack());
        assert_eq!(run_until(&mut tx, base, ms(31999)), Vec::<u64>::new());
        run_until(&mut tx, base, ms(32000));
        assert_eq!(events(&mut tx), vec![ServerEvent::Terminated]);

        // Only from Proceeding, and never for a non-INVITE.
        let mut tx = server(true, false, base);
        assert!(tx.send_response(486, resp(486), base));
        assert!(!tx.send_own_2xx(200, resp(200), base));
        let mut tx = server(false, false, base);
        assert!(!tx.send_own_2xx(200, resp(200), base));
    }

    #[test]
    fn invite_request_retransmit_resends_last_provisional() {
        let base = Instant::now();
        let mut tx = server(true, false, base);
        // Nothing sent yet: absorbed.
        tx.handle_request_retransmit(base);
        assert_eq!(tx.poll_transmit(), None);
        assert!(tx.send_response(100, resp(100), base));
        assert!(tx.send_response(180, resp(180), base + ms(10)));
        assert_eq!(drain(&mut tx), 2);
        tx.handle_request_retransmit(base + ms(500));
        assert_eq!(transmits(&mut tx), vec![resp(180)]);
        assert_eq!(tx.state(), State::Proceeding);
        assert_eq!(tx.last_status(), Some(180));
        assert_eq!(tx.poll_timeout(), None);
    }

    #[test]
    fn invite_request_retransmit_in_completed_resends_final() {
        let base = Instant::now();
        let mut tx = server(true, true, base);
        assert!(tx.send_response(100, resp(100), base));
        assert!(tx.send_response(603, resp(603), base));
        assert_eq!(drain(&mut tx), 2);
        tx.handle_request_retransmit(base + ms(100));
        assert_eq!(transmits(&mut tx), vec![resp(603)]);
    }

    #[test]
    fn invite_second_final_is_refused() {
        let base = Instant::now();
        let mut tx = server(true, false, base);
        assert!(tx.send_response(486, resp(486), base));
        assert_eq!(drain(&mut tx), 1);
        assert!(!tx.send_response(200, resp(200), base));
        assert!(!tx.send_response(500, resp(500), base));
        assert!(!tx.send_response(180, resp(180), base));
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(tx.last_status(), Some(486));
        assert_eq!(tx.state(), State::Completed);
    }

    #[test]
    fn invite_ack_before_final_is_absorbed_without_effect() {
        let base = Instant::now();
        let mut tx = server(true, false, base);
        assert!(tx.handle_ack(base));
        assert_eq!(tx.state(), State::Proceeding);
        assert_eq!(tx.poll_timeout(), None);
    }

    // ---- non-INVITE server (RFC 3261 17.2.2) ----

    #[test]
    fn non_invite_udp_states_and_timer_j() {
        let base = Instant::now();
        let mut tx = server(false, false, base);
        assert_eq!(tx.state(), State::Trying);
        assert_eq!(tx.last_status(), None);
        // Trying: retransmissions absorbed, nothing to send.
        tx.handle_request_retransmit(base + ms(500));
        assert_eq!(tx.poll_transmit(), None);
        assert!(tx.send_response(100, resp(100), base + ms(600)));
        assert_eq!(tx.state(), State::Proceeding);
        assert_eq!(transmits(&mut tx), vec![resp(100)]);
        // Proceeding: last provisional re-sent.
        tx.handle_request_retransmit(base + ms(1500));
        assert_eq!(transmits(&mut tx), vec![resp(100)]);
        assert_eq!(tx.poll_timeout(), None);
        assert!(tx.send_response(200, resp(200), base + ms(2000)));
        assert_eq!(tx.state(), State::Completed);
        assert_eq!(transmits(&mut tx), vec![resp(200)]);
        // Timer J = 64*T1.
        assert_eq!(tx.poll_timeout(), Some(base + ms(34000)));
        // Completed: the final is re-sent; other finals are discarded.
        tx.handle_request_retransmit(base + ms(3500));
        assert_eq!(transmits(&mut tx), vec![resp(200)]);
        assert!(!tx.send_response(500, resp(500), base + ms(3600)));
        assert!(!tx.send_response(180, resp(180), base + ms(3600)));
        assert_eq!(tx.poll_transmit(), None);
        // The transaction itself never retransmits a non-INVITE response.
        let sent = run_until(&mut tx, base, ms(33999));
        assert!(sent.is_empty());
        assert_eq!(tx.poll_event(), None);
        run_until(&mut tx, base, ms(34000));
        assert_eq!(events(&mut tx), vec![ServerEvent::Terminated]);
        assert_eq!(tx.last_status(), Some(200));
        assert_inert(&mut tx, base + ms(34000));
    }

    #[test]
    fn non_invite_final_straight_from_trying() {
        let base = Instant::now();
        let mut tx = server(false, false, base);
        assert!(tx.send_response(404, resp(404), base));
        assert_eq!(tx.state(), State::Completed);
        assert_eq!(tx.poll_timeout(), Some(base + ms(32000)));
    }

    #[test]
    fn non_invite_reliable_timer_j_is_zero_but_response_is_sent() {
        let base = Instant::now();
        let mut tx = server(false, true, base);
        assert!(tx.send_response(200, resp(200), base));
        assert_eq!(tx.state(), State::Terminated);
        assert_eq!(tx.poll_timeout(), None);
        assert_eq!(transmits(&mut tx), vec![resp(200)]);
        assert_eq!(events(&mut tx), vec![ServerEvent::Terminated]);
        assert_inert(&mut tx, base);
    }

    #[test]
    fn non_invite_never_takes_an_ack() {
        let base = Instant::now();
        let mut tx = server(false, false, base);
        assert!(!tx.handle_ack(base));
        assert!(tx.send_response(486, resp(486), base));
        assert!(!tx.handle_ack(base));
        assert_eq!(tx.state(), State::Completed);
    }

    // ---- transport errors and bad input ----

    #[test]
    fn transport_error_reports_and_terminates_once() {
        let base = Instant::now();
        for invite in [true, false] {
            for reliable in [true, false] {
                let mut tx = server(invite, reliable, base);
                assert!(tx.send_response(100, resp(100), base));
                tx.handle_transport_error();
                assert_eq!(tx.state(), State::Terminated);
                assert_eq!(tx.poll_transmit(), None, "queued response dropped");
                assert_eq!(
                    events(&mut tx),
                    vec![ServerEvent::TransportError, ServerEvent::Terminated]
                );
                assert_inert(&mut tx, base);
            }
        }
    }

    #[test]
    fn transport_error_in_completed_stops_timer_g() {
        let base = Instant::now();
        let mut tx = server(true, false, base);
        assert!(tx.send_response(500, resp(500), base));
        drain(&mut tx);
        tx.handle_transport_error();
        assert_eq!(tx.poll_timeout(), None);
        assert_eq!(
            events(&mut tx),
            vec![ServerEvent::TransportError, ServerEvent::Terminated]
        );
    }

    #[test]
    fn late_timeout_call_sends_one_copy_and_h_wins_ties() {
        let base = Instant::now();
        let mut tx = server(true, false, base);
        assert!(tx.send_response(486, resp(486), base));
        drain(&mut tx);
        tx.handle_timeout(base + ms(9000));
        assert_eq!(drain(&mut tx), 1, "missed copies are not sent in a burst");
        assert!(tx.poll_timeout().is_some_and(|t| t > base + ms(9000)));
        // Way past Timer H: no stale retransmission, just the failure.
        tx.handle_timeout(base + Duration::from_secs(60));
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(
            events(&mut tx),
            vec![ServerEvent::AckTimeout, ServerEvent::Terminated]
        );
    }

    #[test]
    fn invalid_status_codes_are_refused() {
        let base = Instant::now();
        let mut tx = server(true, false, base);
        for status in [0, 99, 700] {
            assert!(!tx.send_response(status, resp(status), base));
        }
        assert_eq!(tx.poll_transmit(), None);
        assert_eq!(tx.last_status(), None);
        assert_eq!(tx.state(), State::Proceeding);
    }

    #[test]
    fn is_invite_reports_kind() {
        let base = Instant::now();
        assert!(server(true, false, base).is_invite());
        assert!(!server(false, false, base).is_invite());
    }
}
