//! Calendar periods and their reset boundaries: pure functions of (spec, now).

use chrono::{DateTime, NaiveTime, Utc};
use chrono_tz::Tz;

/// How often a budget resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// Every day at `reset_time`.
    Daily,
    /// Every week on `reset_day` (1=Mon … 7=Sun) at `reset_time`.
    Weekly,
    /// Every month on `reset_day` (1–28) at `reset_time`.
    Monthly,
    /// Every January 1st at `reset_time`.
    Yearly,
    /// Never.
    Infinite,
}

/// Everything that decides where a period starts and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeriodSpec {
    /// The kind of period.
    pub period: Period,
    /// Weekly: 1=Mon…7=Sun; monthly: 1–28; ignored otherwise.
    pub reset_day: u8,
    /// Local wall-clock time of the reset.
    pub reset_time: NaiveTime,
    /// Time zone of the calendar.
    pub timezone: Tz,
}

/// The period that contains an instant: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// First instant of the period (the Unix epoch for `infinite`).
    pub start: DateTime<Utc>,
    /// First instant of the next period; `None` for `infinite`.
    pub end: Option<DateTime<Utc>>,
}

/// The period of `spec` that contains `now`.
pub fn window(spec: &PeriodSpec, now: DateTime<Utc>) -> Window {
    let _ = spec;
    Window { start: now, end: None }
}
