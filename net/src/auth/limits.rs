//! Per-tenant rate limits: token buckets for requests per second and page bytes per second, and
//! a count of calls in flight.
//!
//! A bucket holds one second's worth and refills continuously. A request takes one token and is
//! refused while fewer than one is left; bytes are charged when known (a page stream's size is
//! known once its request is read) and may put the bucket in debt, so one large message is never
//! refused outright — the next ones wait until the debt is paid. A refusal says how long until
//! the bucket has room again (the retry hint).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, now: Instant) -> Self {
        Self { rate, tokens: rate, at: now }
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        if rate != self.rate {
            // A reloaded file changed the rate: start full at the new one.
            *self = Self::new(rate, now);
            return;
        }
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(rate);
        self.at = now;
    }

    /// Take `cost` if at least `need` is there; else the wait until it will be.
    fn take(&mut self, rate: f64, need: f64, cost: f64, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= need {
            self.tokens -= cost;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(((need - self.tokens) / rate).max(0.001)))
        }
    }
}

/// Every tenant's buckets in one process.
#[derive(Debug, Default)]
pub(crate) struct Limits {
    requests: Mutex<HashMap<String, Bucket>>,
    bytes: Mutex<HashMap<String, Bucket>>,
    inflight: Mutex<HashMap<String, Arc<AtomicU32>>>,
}

/// One call in flight; the count goes down when it is dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limits {
    /// One request of `tenant` at `rate` per second.
    pub(crate) fn request(&self, tenant: &str, rate: f64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut m = self.requests.lock();
        let b = m.entry(tenant.to_owned()).or_insert_with(|| Bucket::new(rate, now));
        b.take(rate, 1.0, 1.0, now)
    }

    /// `n` page bytes of `tenant` at `rate` bytes per second: allowed while the bucket is not in
    /// debt, then charged in full.
    pub(crate) fn bytes(&self, tenant: &str, rate: f64, n: u64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut m = self.bytes.lock();
        let b = m.entry(tenant.to_owned()).or_insert_with(|| Bucket::new(rate, now));
        b.take(rate, f64::MIN_POSITIVE, n as f64, now)
    }

    /// Take `n` bytes from `tenant`'s bucket whatever is left (it must exist: see [`Limits::bytes`]).
    pub(crate) fn force(&self, tenant: &str, n: u64) {
        if let Some(b) = self.bytes.lock().get_mut(tenant) {
            b.tokens -= n as f64;
        }
    }

    /// Count a call of `tenant` in flight, unless `max` are already.
    pub(crate) fn enter(&self, tenant: &str, max: u32) -> Option<InFlight> {
        let c = self.inflight.lock().entry(tenant.to_owned()).or_default().clone();
        c.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).ok().map(|_| InFlight(c))
    }

    /// Forget tenants no longer in the file (calls in flight keep their own count alive).
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.requests.lock().retain(|k, _| keep(k));
        self.bytes.lock().retain(|k, _| keep(k));
        self.inflight.lock().retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_with_the_wait_and_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, t0);
        for _ in 0..10 {
            b.take(10.0, 1.0, 1.0, t0).unwrap();
        }
        let wait = b.take(10.0, 1.0, 1.0, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // 0.25 s later two and a half tokens are back: two requests pass, the third waits.
        let t1 = t0 + Duration::from_millis(250);
        b.take(10.0, 1.0, 1.0, t1).unwrap();
        b.take(10.0, 1.0, 1.0, t1).unwrap();
        assert!(b.take(10.0, 1.0, 1.0, t1).is_err());
        // Never more than one second's worth.
        let t2 = t1 + Duration::from_secs(60);
        b.refill(10.0, t2);
        assert_eq!(b.tokens, 10.0);
    }

    #[test]
    fn calls_in_flight_are_counted_until_dropped() {
        let l = Limits::default();
        let a = l.enter("t", 2).unwrap();
        let _b = l.enter("t", 2).unwrap();
        assert!(l.enter("t", 2).is_none());
        assert!(l.enter("other", 2).is_some(), "another tenant has its own count");
        drop(a);
        assert!(l.enter("t", 2).is_some());
    }

    #[test]
    fn bytes_go_into_debt_once_and_wait_it_out() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000.0, t0);
        // One message of 3 s worth passes; the next waits for the debt (2 s) and a little.
        b.take(1000.0, f64::MIN_POSITIVE, 3000.0, t0).unwrap();
        let wait = b.take(1000.0, f64::MIN_POSITIVE, 1.0, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 2.0).abs() < 1e-6, "{wait:?}");
        assert!(b.take(1000.0, f64::MIN_POSITIVE, 1.0, t0 + Duration::from_millis(2001)).is_ok());
    }
}
