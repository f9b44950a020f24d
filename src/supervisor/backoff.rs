//! Restart policy: capped exponential backoff and crash-loop detection.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// First restart delay.
    pub initial: Duration,
    /// The delay doubles up to this cap.
    pub max: Duration,
    /// A run at least this long resets the backoff.
    pub stable_after: Duration,
    /// A run shorter than this counts as a fast failure.
    pub fast_run: Duration,
    /// This many fast failures in a row is a crash loop.
    pub crashloop_after: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            stable_after: Duration::from_secs(60),
            fast_run: Duration::from_secs(10),
            crashloop_after: 3,
        }
    }
}

/// What to do after a child exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub delay: Duration,
    pub crashloop: bool,
}

#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RestartPolicy,
    next: Duration,
    fast_failures: u32,
}

impl Backoff {
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            next: policy.initial,
            fast_failures: 0,
        }
    }

    /// Records an exit after the child ran for `ran_for` and says how long to wait.
    pub fn on_exit(&mut self, ran_for: Duration) -> Decision {
        if ran_for >= self.policy.stable_after {
            self.next = self.policy.initial;
        }
        if ran_for < self.policy.fast_run {
            self.fast_failures += 1;
        } else {
            self.fast_failures = 0;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.policy.max);
        Decision {
            delay,
            crashloop: self.fast_failures >= self.policy.crashloop_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn doubles_to_the_cap() {
        let mut b = Backoff::new(RestartPolicy::default());
        let delays: Vec<_> = (0..7).map(|_| b.on_exit(secs(20)).delay).collect();
        assert_eq!(
            delays,
            vec![
                secs(1),
                secs(2),
                secs(4),
                secs(8),
                secs(16),
                secs(30),
                secs(30)
            ]
        );
    }

    #[test]
    fn stable_run_resets() {
        let mut b = Backoff::new(RestartPolicy::default());
        for _ in 0..4 {
            b.on_exit(secs(20));
        }
        assert_eq!(b.on_exit(secs(61)).delay, secs(1));
        assert_eq!(b.on_exit(secs(1)).delay, secs(2));
    }

    #[test]
    fn fast_failures_in_a_row_are_a_crashloop() {
        let mut b = Backoff::new(RestartPolicy::default());
        assert!(!b.on_exit(secs(0)).crashloop);
        assert!(!b.on_exit(secs(1)).crashloop);
        assert!(b.on_exit(secs(2)).crashloop);
        // a healthy run in between breaks the streak
        assert!(!b.on_exit(secs(15)).crashloop);
        assert!(!b.on_exit(secs(0)).crashloop);
    }

    /// The delays really elapse on the tokio clock, and the whole schedule of a service
    /// that always dies at once adds up to the sum of the capped doubling delays.
    #[tokio::test(start_paused = true)]
    async fn schedule_on_paused_clock() {
        let start = tokio::time::Instant::now();
        let mut b = Backoff::new(RestartPolicy::default());
        for _ in 0..8 {
            let d = b.on_exit(Duration::ZERO);
            tokio::time::sleep(d.delay).await;
        }
        assert_eq!(start.elapsed(), secs(1 + 2 + 4 + 8 + 16 + 30 + 30 + 30));
    }
}
