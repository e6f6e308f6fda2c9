//! Budget alerts: when an agent's usage crosses one of its thresholds (default 75 %, 90 %,
//! 100 %), exactly one alert per (agent, period, threshold).
//!
//! # Flow
//! 1. [`Reservation::settle`](super::ledger::Reservation::settle) reports the committed tokens
//!    of the period before and after the charge (read under the agent's lock, so two
//!    concurrent settles never see the same crossing).
//! 2. [`crossed`] (pure, a few integer multiplications) names the thresholds in between;
//!    almost every request stops here.
//! 3. For each one, [`AlertCenter`] claims the key (agent, period start, threshold) in
//!    memory — the set is loaded from the store at start-up, so a restart does not repeat
//!    an alert — then logs it, keeps it for [`AlertCenter::list`], sends it to the store
//!    through the write-behind channel ([`StoreOp::Alert`], where the key is claimed again
//!    durably with `INSERT OR IGNORE`) and queues it for the webhooks. Nothing blocks.
//!
//! With several replicas ([`AlertCenter::set_claims`], the Redis sync layer) the key is
//! also claimed across replicas with `SET budget:{agent}:alert:{start}:{threshold} NX`
//! (expiring after the period) before the alert is raised; the winner raises it
//! ([`AlertCenter::deliver`]: log, store, webhooks) and shares it, the other replicas only
//! list it ([`AlertCenter::record_remote`]). The in-memory set stays the cheap first filter.
//!
//! Levels: a threshold ≥ 100 % is `limit` (the action applies), ≥ 90 % `critical`, below
//! that `warning`.

use super::ledger::{Ledger, Settled};
use crate::config::{AgentBudget, Config};
use crate::store::{AlertKey, AlertRow, LoadedAlerts, StoreOp, Writer, ALERTS_KEPT};
use crate::webhook::{WebhookStats, Webhooks};
use chrono::{DateTime, SecondsFormat, SubsecRound as _, TimeZone as _, Utc};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How serious an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Below 90 %.
    Warning,
    /// 90 % to below 100 %.
    Critical,
    /// 100 % and above: the agent's action applies.
    Limit,
}

impl Level {
    /// Every level, mildest first.
    pub const ALL: [Level; 3] = [Level::Warning, Level::Critical, Level::Limit];

    /// The level of a threshold: ≥ 100 limit, ≥ 90 critical, else warning.
    pub fn for_threshold(percent: u32) -> Level {
        match percent {
            100.. => Level::Limit,
            90..=99 => Level::Critical,
            _ => Level::Warning,
        }
    }

    /// `warning`, `critical` or `limit`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Warning => "warning",
            Level::Critical => "critical",
            Level::Limit => "limit",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A level name that is not one of `warning`, `critical`, `limit`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown alert level {0:?} (valid: warning, critical, limit)")]
pub struct UnknownLevel(pub String);

impl std::str::FromStr for Level {
    type Err = UnknownLevel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Level::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| UnknownLevel(s.to_string()))
    }
}

/// The thresholds (percent of `max_tokens`) that usage crossed going from `before_tokens`
/// to `after_tokens`: those with `before < t% of max ≤ after`, in the order given. Exact
/// integer arithmetic; nothing when `max_tokens` is 0 or usage did not grow.
pub fn crossed(
    thresholds: &[u32],
    before_tokens: u64,
    after_tokens: u64,
    max_tokens: u64,
) -> impl Iterator<Item = u32> + '_ {
    let reached = move |tokens: u64, t: u32| {
        u128::from(tokens) * 100 >= u128::from(t) * u128::from(max_tokens)
    };
    let grew = max_tokens > 0 && after_tokens > before_tokens;
    thresholds
        .iter()
        .copied()
        .filter(move |&t| grew && !reached(before_tokens, t) && reached(after_tokens, t))
}

/// `tokens` as a percentage of `max`, rounded to hundredths (the STATUS rounding).
fn percent_hundredths(tokens: u64, max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let h = (u128::from(tokens) * 10_000 + u128::from(max) / 2) / u128::from(max);
    u64::try_from(h).unwrap_or(u64::MAX)
}

/// One alert, as the admin API and the `json` webhook format show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Alert {
    /// Increasing id.
    pub id: u64,
    /// The agent.
    pub agent_id: String,
    /// `warning`, `critical` or `limit`.
    pub level: Level,
    /// The threshold crossed, in percent.
    pub threshold_percent: u32,
    /// Percentage of the budget used when the alert fired (hundredths).
    pub percentage: f64,
    /// Start of the budget period (RFC 3339 UTC, seconds).
    #[serde(serialize_with = "ser_secs")]
    pub period_start: DateTime<Utc>,
    /// When the alert fired (RFC 3339 UTC, milliseconds).
    #[serde(serialize_with = "ser_millis")]
    pub created_at: DateTime<Utc>,
    /// Human-readable text.
    pub message: String,
}

fn ser_secs<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

fn ser_millis<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

impl Alert {
    fn to_row(&self, period_end: Option<i64>) -> AlertRow {
        AlertRow {
            id: self.id,
            agent: self.agent_id.clone(),
            period_start: self.period_start.timestamp(),
            period_end,
            threshold_percent: self.threshold_percent,
            level: self.level.as_str().to_string(),
            percentage_hundredths: (self.percentage * 100.0).round() as u64,
            created_at_ms: self.created_at.timestamp_millis(),
            message: self.message.clone(),
        }
    }

    fn from_row(r: &AlertRow) -> Alert {
        Alert {
            id: r.id,
            agent_id: r.agent.clone(),
            level: r
                .level
                .parse()
                .unwrap_or(Level::for_threshold(r.threshold_percent)),
            threshold_percent: r.threshold_percent,
            percentage: r.percentage_hundredths as f64 / 100.0,
            period_start: Utc
                .timestamp_opt(r.period_start, 0)
                .single()
                .unwrap_or(DateTime::UNIX_EPOCH),
            created_at: Utc
                .timestamp_millis_opt(r.created_at_ms)
                .single()
                .unwrap_or(DateTime::UNIX_EPOCH),
            message: r.message.clone(),
        }
    }
}

/// The text of an alert.
fn message(
    agent: &str,
    budget: &AgentBudget,
    threshold: u32,
    hundredths: u64,
    used: u64,
    start: DateTime<Utc>,
) -> String {
    let pct = format!("{}.{:02}%", hundredths / 100, hundredths % 100);
    let period = budget.period.period.as_str();
    let since = start.to_rfc3339_opts(SecondsFormat::Secs, true);
    let max = budget.max_tokens;
    let action = budget.action.as_str();
    if threshold >= 100 {
        format!(
            "agent {agent:?} reached its {period} token budget: {pct} used ({used} of {max} tokens, threshold {threshold}%) in the period that started {since}; action_on_limit {action:?} applies"
        )
    } else {
        format!(
            "agent {agent:?} used {pct} of its {period} token budget ({used} of {max} tokens, threshold {threshold}%) in the period that started {since}; at 100% action_on_limit {action:?} applies"
        )
    }
}

/// How many distinct periods per agent the in-memory dedupe remembers (the running one,
/// plus a few in case a period definition changes back and forth).
const PERIODS_REMEMBERED: usize = 4;

/// Keys an agent already alerted on: (period start, thresholds), most recent period last.
#[derive(Debug, Default)]
struct Fired {
    periods: Vec<(i64, Vec<u32>)>,
}

impl Fired {
    /// `true` when the key is new (and now taken): an in-memory `SET NX`.
    fn claim(&mut self, start: i64, threshold: u32) -> bool {
        if let Some(i) = self.periods.iter().position(|p| p.0 == start) {
            if self.periods[i].1.contains(&threshold) {
                return false;
            }
            let mut p = self.periods.remove(i);
            p.1.push(threshold);
            self.periods.push(p);
            return true;
        }
        if self.periods.len() >= PERIODS_REMEMBERED {
            self.periods.remove(0);
        }
        self.periods.push((start, vec![threshold]));
        true
    }
}

#[derive(Debug)]
struct Recent {
    next_id: u64,
    /// Newest first, at most [`ALERTS_KEPT`].
    alerts: VecDeque<Arc<Alert>>,
}

/// Claims alert keys across replicas (Redis `SET NX`). `claim` must not block: it decides
/// later and calls [`AlertCenter::deliver`] when this replica won the key.
pub trait AlertClaims: Send + Sync + 'static {
    /// Claim the key of `alert` (its id is not assigned yet) for a period ending at
    /// `period_end` (unix seconds; `None`: infinite).
    fn claim(&self, alert: Alert, period_end: Option<i64>);
}

/// Raises, keeps and lists alerts; hands them to the store and the webhooks.
pub struct AlertCenter {
    claims: std::sync::OnceLock<Arc<dyn AlertClaims>>,
    writer: Option<Writer>,
    webhooks: Option<Webhooks>,
    fired: Mutex<HashMap<String, Fired>>,
    recent: Mutex<Recent>,
    raised: [AtomicU64; 3],
}

impl fmt::Debug for AlertCenter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertCenter")
            .field("webhooks", &self.webhooks.is_some())
            .finish_non_exhaustive()
    }
}

/// Webhook numbers when no webhook worker runs.
static NO_WEBHOOKS: WebhookStats = WebhookStats::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keep `alerts` newest (highest id) first and at most [`ALERTS_KEPT`] long.
fn insert_newest_first(alerts: &mut VecDeque<Arc<Alert>>, alert: Arc<Alert>) {
    let at = alerts
        .iter()
        .position(|a| a.id < alert.id)
        .unwrap_or(alerts.len());
    alerts.insert(at, alert);
    alerts.truncate(ALERTS_KEPT);
}

impl AlertCenter {
    /// An alert center that persists through `writer` (`None`: memory only), starts from
    /// what the store had (`loaded`), and hands alerts to `webhooks`.
    pub fn new(writer: Option<Writer>, loaded: LoadedAlerts, webhooks: Option<Webhooks>) -> Self {
        let mut fired: HashMap<String, Fired> = HashMap::new();
        let mut keys = loaded.keys;
        keys.sort_by(|a, b| (&a.agent, a.period_start).cmp(&(&b.agent, b.period_start)));
        for AlertKey {
            agent,
            period_start,
            threshold_percent,
        } in keys
        {
            fired
                .entry(agent)
                .or_default()
                .claim(period_start, threshold_percent);
        }
        let mut alerts: VecDeque<Arc<Alert>> = loaded
            .recent
            .iter()
            .map(|r| Arc::new(Alert::from_row(r)))
            .collect();
        alerts
            .make_contiguous()
            .sort_by_key(|a| std::cmp::Reverse(a.id));
        alerts.truncate(ALERTS_KEPT);
        let max_id = alerts
            .iter()
            .map(|a| a.id)
            .max()
            .unwrap_or(0)
            .max(loaded.max_id);
        Self {
            claims: std::sync::OnceLock::new(),
            writer,
            webhooks,
            fired: Mutex::new(fired),
            recent: Mutex::new(Recent {
                next_id: max_id + 1,
                alerts,
            }),
            raised: Default::default(),
        }
    }

    /// Raise the alerts of one settle of `agent` under `budget` (the live config), at
    /// `now`. Returns how many alerts were raised (almost always 0, without taking a lock).
    pub fn check(
        &self,
        agent: &str,
        budget: &AgentBudget,
        settled: &Settled,
        now: DateTime<Utc>,
    ) -> usize {
        crossed(
            &budget.alert_thresholds,
            settled.before_tokens,
            settled.after_tokens,
            budget.max_tokens,
        )
        .filter(|&t| self.raise(agent, budget, settled, t, now))
        .count()
    }

    /// Raise what usage already stands at but never crossed in a settle: after a config
    /// change (a lower `max_tokens`, a new or lower threshold, another period) an agent can
    /// be past a threshold that no charge took it over. Each agent with usage is checked as
    /// if its whole running usage were one charge; thresholds already alerted in the period
    /// are not raised again (the same keys as [`AlertCenter::check`]). Returns how many
    /// alerts were raised.
    pub fn check_standing(&self, ledger: &Ledger, config: &Config, now: DateTime<Utc>) -> usize {
        ledger
            .agent_ids()
            .iter()
            .map(|agent| {
                let budget = config.budget_for(agent);
                let Some(t) = ledger.totals(agent, &budget.period, now) else {
                    return 0;
                };
                let standing = Settled {
                    before_tokens: 0,
                    after_tokens: t.committed_tokens,
                    window: t.window,
                };
                self.check(agent, budget, &standing, now)
            })
            .sum()
    }

    fn raise(
        &self,
        agent: &str,
        budget: &AgentBudget,
        settled: &Settled,
        threshold: u32,
        now: DateTime<Utc>,
    ) -> bool {
        let start = settled.window.start;
        let new = lock(&self.fired)
            .entry(agent.to_string())
            .or_default()
            .claim(start.timestamp(), threshold);
        if !new {
            return false;
        }
        let level = Level::for_threshold(threshold);
        let hundredths = percent_hundredths(settled.after_tokens, budget.max_tokens);
        let text = message(
            agent,
            budget,
            threshold,
            hundredths,
            settled.after_tokens,
            start,
        );
        let alert = Alert {
            id: 0,
            agent_id: agent.to_string(),
            level,
            threshold_percent: threshold,
            percentage: hundredths as f64 / 100.0,
            period_start: start,
            // Milliseconds: what the store keeps, so a reloaded alert is the same.
            created_at: now.trunc_subsecs(3),
            message: text,
        };
        let end = settled.window.end.map(|e| e.timestamp());
        match self.claims.get() {
            Some(c) => c.claim(alert, end),
            None => {
                self.deliver(alert, None, end);
            }
        }
        true
    }

    /// Replica sync: claim alert keys across replicas with `claims` from now on.
    pub fn set_claims(&self, claims: Arc<dyn AlertClaims>) {
        let _ = self.claims.set(claims);
    }

    /// Raise `alert` (its key is claimed): give it `id` (`None`: the next local id), keep it
    /// for the list, log it, store it and queue it for the webhooks. Returns the stored row.
    pub fn deliver(&self, mut alert: Alert, id: Option<u64>, period_end: Option<i64>) -> AlertRow {
        let level = alert.level;
        let agent = alert.agent_id.clone();
        let threshold = alert.threshold_percent;
        let alert = {
            let mut recent = lock(&self.recent);
            alert.id = id.unwrap_or(recent.next_id);
            recent.next_id = recent.next_id.max(alert.id + 1);
            let alert = Arc::new(alert);
            insert_newest_first(&mut recent.alerts, alert.clone());
            alert
        };
        self.raised[level as usize].fetch_add(1, Ordering::Relaxed);
        match level {
            Level::Limit => {
                tracing::error!(target: "alerts", agent = %agent, level = %level, threshold, percentage = alert.percentage, id = alert.id, "{}", alert.message)
            }
            _ => {
                tracing::warn!(target: "alerts", agent = %agent, level = %level, threshold, percentage = alert.percentage, id = alert.id, "{}", alert.message)
            }
        }
        let row = alert.to_row(period_end);
        if let Some(w) = &self.writer {
            w.send(StoreOp::Alert(row.clone()));
        }
        if let Some(h) = &self.webhooks {
            h.enqueue(alert);
        }
        row
    }

    /// Replica sync: another replica raised this alert. Keep it for the list and the store
    /// (its key is now claimed here too); no log line, no webhook (the raiser sent them).
    pub fn record_remote(&self, row: &AlertRow) {
        lock(&self.fired)
            .entry(row.agent.clone())
            .or_default()
            .claim(row.period_start, row.threshold_percent);
        {
            let mut recent = lock(&self.recent);
            if recent.alerts.iter().any(|a| a.id == row.id) {
                return;
            }
            recent.next_id = recent.next_id.max(row.id + 1);
            insert_newest_first(&mut recent.alerts, Arc::new(Alert::from_row(row)));
        }
        if let Some(w) = &self.writer {
            w.send(StoreOp::Alert(row.clone()));
        }
    }

    /// Alerts newest first, filtered by agent, level and `created_at >= since`.
    pub fn list(
        &self,
        agent: Option<&str>,
        level: Option<Level>,
        since: Option<DateTime<Utc>>,
    ) -> Vec<Alert> {
        self.list_newest(agent, level, since, usize::MAX)
    }

    /// The `limit` newest of [`AlertCenter::list`] (a dashboard asks for a few every two
    /// seconds, of up to 10,000 kept).
    pub fn list_newest(
        &self,
        agent: Option<&str>,
        level: Option<Level>,
        since: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Vec<Alert> {
        lock(&self.recent)
            .alerts
            .iter()
            .filter(|a| agent.is_none_or(|x| a.agent_id == x))
            .filter(|a| level.is_none_or(|l| a.level == l))
            .filter(|a| since.is_none_or(|s| a.created_at >= s))
            .take(limit)
            .map(|a| (**a).clone())
            .collect()
    }

    /// Alerts raised by this process at `level` (not counting those loaded at start-up).
    pub fn raised(&self, level: Level) -> u64 {
        self.raised[level as usize].load(Ordering::Relaxed)
    }

    /// Webhook delivery counters (all zero when no webhook worker runs).
    pub fn webhook_stats(&self) -> &WebhookStats {
        self.webhooks.as_ref().map_or(&NO_WEBHOOKS, |w| w.stats())
    }

    /// The webhook worker, if any.
    pub fn webhooks(&self) -> Option<&Webhooks> {
        self.webhooks.as_ref()
    }

    /// Deliver what the webhooks have queued, waiting at most `deadline`; later alerts are
    /// no longer sent to webhooks.
    pub async fn shutdown(&self, deadline: Duration) {
        if let Some(w) = &self.webhooks {
            w.shutdown(deadline).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::period::Window;
    use chrono::TimeZone;

    fn collect(th: &[u32], before: u64, after: u64, max: u64) -> Vec<u32> {
        crossed(th, before, after, max).collect()
    }

    #[test]
    fn crossed_names_each_threshold_between_before_and_after() {
        let th = [75, 90, 100];
        assert_eq!(collect(&th, 0, 500, 1000), Vec::<u32>::new());
        assert_eq!(collect(&th, 500, 750, 1000), vec![75]);
        assert_eq!(collect(&th, 749, 750, 1000), vec![75]);
        assert_eq!(collect(&th, 750, 899, 1000), Vec::<u32>::new());
        assert_eq!(collect(&th, 750, 900, 1000), vec![90]);
        assert_eq!(collect(&th, 900, 1000, 1000), vec![100]);
        assert_eq!(collect(&th, 1000, 5000, 1000), Vec::<u32>::new());
    }

    #[test]
    fn crossed_a_jump_over_several_thresholds_names_each_once() {
        assert_eq!(collect(&[75, 90, 100], 0, 1000, 1000), vec![75, 90, 100]);
        assert_eq!(collect(&[75, 90, 100], 100, 950, 1000), vec![75, 90]);
        assert_eq!(
            collect(&[50, 100, 150], 0, 10_000, 1000),
            vec![50, 100, 150]
        );
    }

    #[test]
    fn crossed_is_exact_at_fractional_boundaries() {
        // 75 % of 3 tokens is 2.25 tokens: 2 is below, 3 is above.
        assert_eq!(collect(&[75], 0, 2, 3), Vec::<u32>::new());
        assert_eq!(collect(&[75], 2, 3, 3), vec![75]);
        // Huge numbers do not overflow.
        assert_eq!(collect(&[100], 0, u64::MAX, u64::MAX), vec![100]);
        assert_eq!(
            collect(&[1000], u64::MAX - 1, u64::MAX, u64::MAX / 10),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn crossed_is_empty_without_growth_budget_or_thresholds() {
        assert_eq!(collect(&[75], 800, 800, 1000), Vec::<u32>::new());
        assert_eq!(collect(&[75], 900, 100, 1000), Vec::<u32>::new());
        assert_eq!(collect(&[75], 0, 100, 0), Vec::<u32>::new());
        assert_eq!(collect(&[], 0, 1000, 1000), Vec::<u32>::new());
    }

    #[test]
    fn levels_of_thresholds_and_names() {
        assert_eq!(Level::for_threshold(1), Level::Warning);
        assert_eq!(Level::for_threshold(75), Level::Warning);
        assert_eq!(Level::for_threshold(89), Level::Warning);
        assert_eq!(Level::for_threshold(90), Level::Critical);
        assert_eq!(Level::for_threshold(99), Level::Critical);
        assert_eq!(Level::for_threshold(100), Level::Limit);
        assert_eq!(Level::for_threshold(250), Level::Limit);
        for l in Level::ALL {
            assert_eq!(l.as_str().parse::<Level>(), Ok(l));
            assert_eq!(serde_json::to_value(l).unwrap(), l.as_str());
        }
        let e = "fatal".parse::<Level>().unwrap_err();
        assert!(e.to_string().contains("warning, critical, limit"), "{e}");
    }

    #[test]
    fn percentages_round_to_hundredths() {
        assert_eq!(percent_hundredths(750, 1000), 7500);
        assert_eq!(percent_hundredths(2, 3), 6667);
        assert_eq!(percent_hundredths(1, 3), 3333);
        assert_eq!(percent_hundredths(5, 0), 0);
    }

    #[test]
    fn the_in_memory_claim_is_once_per_key_and_bounded() {
        let mut f = Fired::default();
        assert!(f.claim(10, 75));
        assert!(!f.claim(10, 75));
        assert!(f.claim(10, 90));
        for start in 20..30 {
            assert!(f.claim(start, 75));
        }
        assert_eq!(f.periods.len(), PERIODS_REMEMBERED);
        assert!(!f.claim(29, 75));
    }

    use crate::config::test_budget as budget;

    fn settled(before: u64, after: u64, start: i64) -> Settled {
        Settled {
            before_tokens: before,
            after_tokens: after,
            window: Window {
                start: Utc.timestamp_opt(start, 0).unwrap(),
                end: Some(Utc.timestamp_opt(start + 86_400 * 30, 0).unwrap()),
            },
        }
    }

    #[test]
    fn an_alert_center_raises_once_per_key_and_lists_newest_first() {
        let c = AlertCenter::new(None, LoadedAlerts::default(), None);
        let b = budget(1000);
        let t0 = Utc.timestamp_opt(1_700_000_100, 0).unwrap();
        assert_eq!(c.check("a", &b, &settled(0, 800, 1_700_000_000), t0), 1);
        // The same crossing again (e.g. after a reset in the same period): nothing.
        assert_eq!(c.check("a", &b, &settled(0, 800, 1_700_000_000), t0), 0);
        let t1 = t0 + chrono::Duration::seconds(10);
        assert_eq!(c.check("a", &b, &settled(800, 1200, 1_700_000_000), t1), 2);
        // A new period alerts again.
        assert_eq!(c.check("a", &b, &settled(0, 800, 1_800_000_000), t1), 1);
        assert_eq!(c.check("b", &b, &settled(0, 950, 1_700_000_000), t1), 2);

        let all = c.list(None, None, None);
        assert_eq!(all.len(), 6);
        let ids: Vec<u64> = all.iter().map(|a| a.id).collect();
        assert_eq!(ids, vec![6, 5, 4, 3, 2, 1]);
        let a = c.list(Some("a"), None, None);
        assert_eq!(a.len(), 4);
        assert_eq!(a[3].threshold_percent, 75);
        assert_eq!(a[3].level, Level::Warning);
        assert_eq!(a[3].percentage, 80.0);
        assert_eq!(c.list(None, Some(Level::Limit), None).len(), 1);
        assert_eq!(c.list(None, None, Some(t1)).len(), 5);
        assert_eq!(c.list(Some("b"), Some(Level::Critical), Some(t1)).len(), 1);
        assert_eq!(c.raised(Level::Warning), 3);
        assert_eq!(c.raised(Level::Critical), 2);
        assert_eq!(c.raised(Level::Limit), 1);
        assert_eq!(c.webhook_stats().snapshot(), Default::default());

        let lim = &a[1];
        assert_eq!(
            (lim.id, lim.level, lim.threshold_percent),
            (3, Level::Limit, 100)
        );
        let json = serde_json::to_value(lim).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            [
                "agent_id",
                "created_at",
                "id",
                "level",
                "message",
                "percentage",
                "period_start",
                "threshold_percent"
            ]
        );
        assert_eq!(json["period_start"], "2023-11-14T22:13:20Z");
        assert_eq!(json["created_at"], "2023-11-14T22:15:10.000Z");
        assert_eq!(json["level"], "limit");
        let m = lim.message.as_str();
        assert!(
            m.contains("\"a\"") && m.contains("120.00%") && m.contains("\"block\""),
            "{m}"
        );
    }

    #[test]
    fn keys_and_alerts_loaded_from_the_store_are_not_raised_again() {
        let row = AlertRow {
            id: 41,
            agent: "a".into(),
            period_start: 1_700_000_000,
            period_end: None,
            threshold_percent: 75,
            level: "warning".into(),
            percentage_hundredths: 7612,
            created_at_ms: 1_700_000_050_123,
            message: "m".into(),
        };
        let loaded = LoadedAlerts {
            recent: vec![row.clone()],
            keys: vec![AlertKey {
                agent: "a".into(),
                period_start: 1_700_000_000,
                threshold_percent: 75,
            }],
            max_id: 41,
        };
        let c = AlertCenter::new(None, loaded, None);
        let now = Utc.timestamp_opt(1_700_000_200, 0).unwrap();
        assert_eq!(
            c.check("a", &budget(1000), &settled(0, 950, 1_700_000_000), now),
            1
        );
        let all = c.list(None, None, None);
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].id, all[0].threshold_percent), (42, 90));
        assert_eq!(all[1].percentage, 76.12);
        assert_eq!(all[1].to_row(None), row);
    }
}
