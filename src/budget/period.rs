//! Calendar periods and their reset boundaries: pure functions of (spec, now).
//!
//! A budget's counters are keyed by the period that contains "now". The boundaries are
//! computed on the local calendar of the spec's time zone at the local `reset_time`, then
//! turned into UTC instants, so a "monthly at 00:00 Europe/Paris" budget resets at the
//! French midnight whatever the offset of the day.
//!
//! Invariants (tested below):
//! - `window(spec, t).start <= t < window(spec, t).end` for every instant `t`;
//! - the `end` of one window is the `start` of the next, so no instant is in two periods;
//! - an instant exactly at a boundary belongs to the period that starts there.
//!
//! DST: a local reset time that does not exist (spring-forward gap) resolves to the first
//! instant after the gap; one that exists twice (fall back) resolves to the earlier instant.
//!
//! Nothing here reads the system clock: `now` is always a parameter.

use chrono::{
    DateTime, Datelike, Days, LocalResult, Months, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta,
    TimeZone, Utc,
};
use chrono_tz::Tz;
use std::fmt;
use std::str::FromStr;

/// How often a budget resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

impl Period {
    /// Every period, in the order used by messages that list the valid values.
    pub const ALL: [Period; 5] = [
        Period::Daily,
        Period::Weekly,
        Period::Monthly,
        Period::Yearly,
        Period::Infinite,
    ];

    /// The name used in budgets.json and in the admin API (`"monthly"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
            Period::Infinite => "infinite",
        }
    }

    /// The valid `reset_day` values of this period (`None`: the period has no reset day and
    /// ignores the key), so validation and error messages share one source of truth.
    pub fn reset_day_range(self) -> Option<std::ops::RangeInclusive<u8>> {
        match self {
            Period::Weekly => Some(1..=7),
            Period::Monthly => Some(1..=28),
            Period::Daily | Period::Yearly | Period::Infinite => None,
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of [`Period::from_str`]: names the bad value and the valid ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown period {0:?} (valid: daily, weekly, monthly, yearly, infinite)")]
pub struct ParsePeriodError(pub String);

impl FromStr for Period {
    type Err = ParsePeriodError;

    /// Parses the budgets.json spelling, so the CLI and the admin API accept the same words.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Period::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ParsePeriodError(s.to_string()))
    }
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

impl Window {
    /// Whether `t` is in `[start, end)`; a caller holding a cached window uses this to know
    /// when it must compute the next one.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        t >= self.start && self.end.is_none_or(|end| t < end)
    }

    /// Whole seconds from `now` to the end of the window, rounded up (at least 1 while the
    /// window has not ended); `None` for `infinite`. This is the `Retry-After` /
    /// `retryDelay` value of DESIGN.md, computed in one place.
    pub fn seconds_until_end(&self, now: DateTime<Utc>) -> Option<u64> {
        let end = self.end?;
        let delta = end.signed_duration_since(now);
        if delta <= TimeDelta::zero() {
            return Some(0);
        }
        let secs = u64::try_from(delta.num_seconds()).unwrap_or(0);
        let rounded_up = if delta.subsec_nanos() > 0 {
            secs.saturating_add(1)
        } else {
            secs
        };
        Some(rounded_up)
    }
}

/// The period of `spec` that contains `now`.
///
/// Infallible for every date a deployment will meet; at the very edge of chrono's calendar
/// (year ±262 000) where the next boundary cannot be represented, the window is open-ended
/// (`end: None`) rather than a panic.
pub fn window(spec: &PeriodSpec, now: DateTime<Utc>) -> Window {
    if spec.period == Period::Infinite {
        return Window {
            start: DateTime::UNIX_EPOCH,
            end: None,
        };
    }
    try_window(spec, now).unwrap_or(Window {
        start: now,
        end: None,
    })
}

/// The window of a finite period, or `None` on calendar overflow.
fn try_window(spec: &PeriodSpec, now: DateTime<Utc>) -> Option<Window> {
    let local_date = now.with_timezone(&spec.timezone).date_naive();
    let mut day = anchor(spec, local_date)?;
    let mut start = boundary(spec, day)?;
    // The anchor's boundary is at most one period away from `now`; these loops correct for
    // offsets (a reset time late in the local day, DST) and terminate after a step or two.
    while start > now {
        day = step(spec, day, false)?;
        start = boundary(spec, day)?;
    }
    let mut next_day = step(spec, day, true)?;
    let mut end = boundary(spec, next_day)?;
    while end <= now {
        start = end;
        next_day = step(spec, next_day, true)?;
        end = boundary(spec, next_day)?;
    }
    Some(Window {
        start,
        end: Some(end),
    })
}

/// The local date of the latest reset on or before `date` (ignoring the time of day).
fn anchor(spec: &PeriodSpec, date: NaiveDate) -> Option<NaiveDate> {
    match spec.period {
        Period::Daily => Some(date),
        Period::Weekly => {
            let reset = u32::from(spec.reset_day.clamp(1, 7));
            let today = date.weekday().number_from_monday();
            let back = (today + 7 - reset) % 7;
            date.checked_sub_days(Days::new(u64::from(back)))
        }
        Period::Monthly => {
            let reset = u32::from(spec.reset_day.clamp(1, 28));
            let this_month = date.with_day(reset)?;
            if date.day() >= reset {
                Some(this_month)
            } else {
                this_month.checked_sub_months(Months::new(1))
            }
        }
        Period::Yearly => NaiveDate::from_ymd_opt(date.year(), 1, 1),
        Period::Infinite => None,
    }
}

/// The reset date one period after (`forward`) or before `day`, which is itself a reset date.
fn step(spec: &PeriodSpec, day: NaiveDate, forward: bool) -> Option<NaiveDate> {
    let (days, months) = match spec.period {
        Period::Daily => (1, 0),
        Period::Weekly => (7, 0),
        Period::Monthly => (0, 1),
        Period::Yearly => (0, 12),
        Period::Infinite => return None,
    };
    match (forward, days) {
        (true, 0) => day.checked_add_months(Months::new(months)),
        (false, 0) => day.checked_sub_months(Months::new(months)),
        (true, d) => day.checked_add_days(Days::new(d)),
        (false, d) => day.checked_sub_days(Days::new(d)),
    }
}

/// The UTC instant of the reset on local date `day`.
fn boundary(spec: &PeriodSpec, day: NaiveDate) -> Option<DateTime<Utc>> {
    resolve_local(&spec.timezone, day.and_time(spec.reset_time))
}

/// A local wall-clock time as a UTC instant: the earlier instant when it is ambiguous (fall
/// back), the first instant after the gap when it does not exist (spring forward).
pub fn resolve_local(tz: &Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
        LocalResult::None => first_instant_reaching(tz, local),
    }
}

/// The first instant whose local time is at or after `local`, i.e. the transition that
/// opened the gap `local` falls in. Every UTC offset is within ±15 h, so the transition lies
/// within 15 h either side of `local` read as UTC; a binary search to the second finds it
/// (tz transitions happen on whole seconds).
fn first_instant_reaching(tz: &Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    let as_utc = local.and_utc();
    let window = TimeDelta::try_hours(15)?;
    let mut lo = as_utc.checked_sub_signed(window)?; // local time here is before `local`
    let mut hi = as_utc.checked_add_signed(window)?; // local time here is after `local`
    let reaches = |t: DateTime<Utc>| t.with_timezone(tz).naive_local() >= local;
    while hi.signed_duration_since(lo) > TimeDelta::seconds(1) {
        let half = hi.signed_duration_since(lo) / 2;
        let mid = lo.checked_add_signed(half)?;
        if reaches(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    // `hi` may carry a sub-second remainder from the start point; transitions are on whole
    // seconds, so truncating keeps the answer on the transition.
    let whole = DateTime::from_timestamp(hi.timestamp(), 0)?;
    Some(if reaches(whole) { whole } else { hi })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::America::New_York;
    use chrono_tz::Asia::Kolkata;
    use chrono_tz::Europe::Paris;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn spec(period: Period, reset_day: u8, reset_time: &str, timezone: Tz) -> PeriodSpec {
        PeriodSpec {
            period,
            reset_day,
            reset_time: NaiveTime::parse_from_str(reset_time, "%H:%M").unwrap(),
            timezone,
        }
    }

    fn check(s: &PeriodSpec, now: &str, start: &str, end: &str) {
        let w = window(s, utc(now));
        assert_eq!(w.start, utc(start), "start of the window containing {now}");
        assert_eq!(w.end, Some(utc(end)), "end of the window containing {now}");
    }

    #[test]
    fn weekly_resets_on_sunday_with_reset_day_7() {
        let s = spec(Period::Weekly, 7, "00:00", Tz::UTC);
        // 2026-03-04 is a Wednesday; the previous Sunday is 2026-03-01.
        check(
            &s,
            "2026-03-04T12:00:00Z",
            "2026-03-01T00:00:00Z",
            "2026-03-08T00:00:00Z",
        );
        // Sunday itself, at the boundary: a new week.
        check(
            &s,
            "2026-03-08T00:00:00Z",
            "2026-03-08T00:00:00Z",
            "2026-03-15T00:00:00Z",
        );
        // Saturday night, one second before.
        check(
            &s,
            "2026-03-07T23:59:59Z",
            "2026-03-01T00:00:00Z",
            "2026-03-08T00:00:00Z",
        );
    }

    #[test]
    fn weekly_monday_is_iso_day_1() {
        let s = spec(Period::Weekly, 1, "09:00", Tz::UTC);
        // Monday 2026-03-02 before 09:00 is still in the week that began Monday 2026-02-23.
        check(
            &s,
            "2026-03-02T08:59:59Z",
            "2026-02-23T09:00:00Z",
            "2026-03-02T09:00:00Z",
        );
        check(
            &s,
            "2026-03-02T09:00:00Z",
            "2026-03-02T09:00:00Z",
            "2026-03-09T09:00:00Z",
        );
    }

    #[test]
    fn monthly_day_28_through_february_leap_and_non_leap() {
        let s = spec(Period::Monthly, 28, "00:00", Tz::UTC);
        // 2028 is a leap year: Feb 29 is inside [Feb 28, Mar 28).
        check(
            &s,
            "2028-02-29T12:00:00Z",
            "2028-02-28T00:00:00Z",
            "2028-03-28T00:00:00Z",
        );
        check(
            &s,
            "2028-02-27T23:59:59Z",
            "2028-01-28T00:00:00Z",
            "2028-02-28T00:00:00Z",
        );
        check(
            &s,
            "2028-03-01T00:00:00Z",
            "2028-02-28T00:00:00Z",
            "2028-03-28T00:00:00Z",
        );
        // 2027 is not.
        check(
            &s,
            "2027-03-01T00:00:00Z",
            "2027-02-28T00:00:00Z",
            "2027-03-28T00:00:00Z",
        );
        check(
            &s,
            "2027-02-28T00:00:00Z",
            "2027-02-28T00:00:00Z",
            "2027-03-28T00:00:00Z",
        );
        check(
            &s,
            "2027-02-10T00:00:00Z",
            "2027-01-28T00:00:00Z",
            "2027-02-28T00:00:00Z",
        );
    }

    #[test]
    fn monthly_day_1_across_the_year_end() {
        let s = spec(Period::Monthly, 1, "00:00", Tz::UTC);
        check(
            &s,
            "2026-12-31T23:59:59Z",
            "2026-12-01T00:00:00Z",
            "2027-01-01T00:00:00Z",
        );
        check(
            &s,
            "2027-01-01T00:00:00Z",
            "2027-01-01T00:00:00Z",
            "2027-02-01T00:00:00Z",
        );
        check(
            &s,
            "2027-01-15T08:00:00Z",
            "2027-01-01T00:00:00Z",
            "2027-02-01T00:00:00Z",
        );
    }

    #[test]
    fn monthly_in_a_zone_ahead_of_utc_starts_the_previous_utc_day() {
        // Midnight in Paris on 2026-07-01 (CEST, UTC+2) is 22:00 UTC on 2026-06-30.
        let s = spec(Period::Monthly, 1, "00:00", Paris);
        check(
            &s,
            "2026-06-30T22:30:00Z",
            "2026-06-30T22:00:00Z",
            "2026-07-31T22:00:00Z",
        );
        check(
            &s,
            "2026-06-30T21:59:59Z",
            "2026-05-31T22:00:00Z",
            "2026-06-30T22:00:00Z",
        );
        // January is CET (UTC+1): the window spans the October change.
        check(
            &s,
            "2026-10-15T00:00:00Z",
            "2026-09-30T22:00:00Z",
            "2026-10-31T23:00:00Z",
        );
    }

    #[test]
    fn daily_new_york_spring_forward_with_reset_in_the_gap() {
        // 2026-03-08: clocks go from 02:00 EST to 03:00 EDT; 02:30 does not exist that day,
        // so the reset happens at the first instant after the gap, 03:00 EDT = 07:00Z.
        let s = spec(Period::Daily, 1, "02:30", New_York);
        check(
            &s,
            "2026-03-08T06:59:59Z",
            "2026-03-07T07:30:00Z",
            "2026-03-08T07:00:00Z",
        );
        check(
            &s,
            "2026-03-08T07:00:00Z",
            "2026-03-08T07:00:00Z",
            "2026-03-09T06:30:00Z",
        );
        // The day before and the day after are normal: 02:30 EST = 07:30Z, 02:30 EDT = 06:30Z.
        check(
            &s,
            "2026-03-07T12:00:00Z",
            "2026-03-07T07:30:00Z",
            "2026-03-08T07:00:00Z",
        );
        check(
            &s,
            "2026-03-09T12:00:00Z",
            "2026-03-09T06:30:00Z",
            "2026-03-10T06:30:00Z",
        );
    }

    #[test]
    fn daily_new_york_midnight_across_spring_forward_is_a_23_hour_day() {
        let s = spec(Period::Daily, 1, "00:00", New_York);
        let w = window(&s, utc("2026-03-08T12:00:00Z"));
        assert_eq!(w.start, utc("2026-03-08T05:00:00Z"));
        assert_eq!(w.end, Some(utc("2026-03-09T04:00:00Z")));
    }

    #[test]
    fn daily_new_york_fall_back_uses_the_earlier_instant() {
        // 2026-11-01: clocks go from 02:00 EDT back to 01:00 EST; 01:30 happens twice
        // (05:30Z EDT and 06:30Z EST). The reset is at the first, 05:30Z.
        let s = spec(Period::Daily, 1, "01:30", New_York);
        check(
            &s,
            "2026-11-01T05:29:59Z",
            "2026-10-31T05:30:00Z",
            "2026-11-01T05:30:00Z",
        );
        check(
            &s,
            "2026-11-01T05:30:00Z",
            "2026-11-01T05:30:00Z",
            "2026-11-02T06:30:00Z",
        );
        // The second 01:30 does not start another period.
        check(
            &s,
            "2026-11-01T06:30:00Z",
            "2026-11-01T05:30:00Z",
            "2026-11-02T06:30:00Z",
        );
        // A reset inside the former gap is a normal time on this day: 02:30 EST = 07:30Z.
        let s = spec(Period::Daily, 1, "02:30", New_York);
        check(
            &s,
            "2026-11-01T07:00:00Z",
            "2026-10-31T06:30:00Z",
            "2026-11-01T07:30:00Z",
        );
        check(
            &s,
            "2026-11-01T07:30:00Z",
            "2026-11-01T07:30:00Z",
            "2026-11-02T07:30:00Z",
        );
    }

    #[test]
    fn daily_at_0730_in_kolkata() {
        // IST is UTC+05:30 all year: 07:30 IST = 02:00Z.
        let s = spec(Period::Daily, 1, "07:30", Kolkata);
        check(
            &s,
            "2026-05-10T01:59:59Z",
            "2026-05-09T02:00:00Z",
            "2026-05-10T02:00:00Z",
        );
        check(
            &s,
            "2026-05-10T02:00:00Z",
            "2026-05-10T02:00:00Z",
            "2026-05-11T02:00:00Z",
        );
        // Monthly on the 1st at 07:30 IST.
        let s = spec(Period::Monthly, 1, "07:30", Kolkata);
        check(
            &s,
            "2026-06-01T01:00:00Z",
            "2026-05-01T02:00:00Z",
            "2026-06-01T02:00:00Z",
        );
    }

    #[test]
    fn yearly_resets_on_january_first() {
        let s = spec(Period::Yearly, 15, "00:00", Tz::UTC);
        check(
            &s,
            "2026-07-04T10:00:00Z",
            "2026-01-01T00:00:00Z",
            "2027-01-01T00:00:00Z",
        );
        check(
            &s,
            "2027-01-01T00:00:00Z",
            "2027-01-01T00:00:00Z",
            "2028-01-01T00:00:00Z",
        );
        check(
            &s,
            "2026-12-31T23:59:59Z",
            "2026-01-01T00:00:00Z",
            "2027-01-01T00:00:00Z",
        );
        // In New York, the new year starts at 05:00Z.
        let s = spec(Period::Yearly, 1, "00:00", New_York);
        check(
            &s,
            "2027-01-01T04:59:59Z",
            "2026-01-01T05:00:00Z",
            "2027-01-01T05:00:00Z",
        );
    }

    #[test]
    fn infinite_starts_at_the_epoch_and_never_ends() {
        let s = spec(Period::Infinite, 1, "00:00", New_York);
        let w = window(&s, utc("2026-07-04T10:00:00Z"));
        assert_eq!(w.start, DateTime::UNIX_EPOCH);
        assert_eq!(w.end, None);
        assert_eq!(w.seconds_until_end(utc("2026-07-04T10:00:00Z")), None);
        assert!(w.contains(utc("2100-01-01T00:00:00Z")));
    }

    #[test]
    fn seconds_until_end_rounds_up() {
        let s = spec(Period::Daily, 1, "00:00", Tz::UTC);
        let now = utc("2026-05-10T23:59:58.250Z");
        let w = window(&s, now);
        assert_eq!(w.seconds_until_end(now), Some(2));
        assert_eq!(w.seconds_until_end(utc("2026-05-10T23:59:58Z")), Some(2));
        assert_eq!(w.seconds_until_end(utc("2026-05-11T00:00:00Z")), Some(0));
    }

    #[test]
    fn period_names_round_trip() {
        for p in Period::ALL {
            assert_eq!(p.as_str().parse::<Period>(), Ok(p));
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{p}\""));
        }
        assert!("fortnightly".parse::<Period>().is_err());
    }

    /// Over many instants and specs: `now` is in its window, an instant at `start` gets the
    /// same window, the instant at `end` gets a window starting at `end`, and one nanosecond
    /// before `start` gets a window ending at `start`.
    #[test]
    fn windows_tile_time_without_gaps_or_overlaps() {
        let zones = [
            Tz::UTC,
            New_York,
            Kolkata,
            Paris,
            chrono_tz::Australia::Lord_Howe, // 30-minute DST shift
            chrono_tz::Pacific::Apia,        // skipped 2011-12-30 entirely
            chrono_tz::America::Sao_Paulo,   // historical DST changes at midnight
            chrono_tz::Pacific::Chatham,     // UTC+12:45 / +13:45
        ];
        let times = [
            "00:00", "00:30", "01:30", "02:00", "02:30", "03:00", "07:30", "23:59",
        ];
        let specs = [
            (Period::Daily, 1),
            (Period::Weekly, 1),
            (Period::Weekly, 7),
            (Period::Monthly, 1),
            (Period::Monthly, 28),
            (Period::Yearly, 1),
        ];
        let mut checked = 0u32;
        for tz in zones {
            for t in times {
                for (period, day) in specs {
                    let s = spec(period, day, t, tz);
                    // Every 11 h 13 min 17 s for ~117 days from each origin: the Apia
                    // skipped day, Sao Paulo's midnight changes, both 2026 US changes.
                    for origin in [
                        "2011-12-01T00:00:00Z",
                        "2018-10-20T00:00:00Z",
                        "2019-01-20T00:00:00Z",
                        "2026-01-01T00:00:00Z",
                        "2026-09-15T00:00:00Z",
                    ] {
                        let mut now = utc(origin);
                        for _ in 0..250 {
                            let w = window(&s, now);
                            let end = w.end.unwrap();
                            assert!(w.start <= now && now < end, "{s:?} {now}: {w:?}");
                            assert_eq!(window(&s, w.start), w, "{s:?} at start {}", w.start);
                            let next = window(&s, end);
                            assert_eq!(next.start, end, "{s:?}: next window after {w:?}");
                            let before = window(&s, w.start - TimeDelta::nanoseconds(1));
                            assert_eq!(before.end, Some(w.start), "{s:?}: before {w:?}");
                            now += TimeDelta::seconds(11 * 3600 + 13 * 60 + 17);
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 10_000);
    }

    #[test]
    fn daily_sao_paulo_midnight_gap_and_midnight_fall_back() {
        // 2018-11-04 00:00 -03 became 01:00 -02: the midnight reset happens at 01:00 -02.
        let s = spec(Period::Daily, 1, "00:00", chrono_tz::America::Sao_Paulo);
        check(
            &s,
            "2018-11-04T12:00:00Z",
            "2018-11-04T03:00:00Z",
            "2018-11-05T02:00:00Z",
        );
        // 2019-02-17 00:00 -02 became 2019-02-16 23:00 -03: Feb 16 lasts 25 hours.
        check(
            &s,
            "2019-02-17T02:30:00Z",
            "2019-02-16T02:00:00Z",
            "2019-02-17T03:00:00Z",
        );
    }

    #[test]
    fn gap_resolution_finds_the_transition_instant() {
        // Lord Howe moves from +10:30 to +11:00 at 02:00 local on 2026-10-04.
        let tz = chrono_tz::Australia::Lord_Howe;
        let local = NaiveDate::from_ymd_opt(2026, 10, 4)
            .unwrap()
            .and_hms_opt(2, 10, 0)
            .unwrap();
        assert_eq!(resolve_local(&tz, local), Some(utc("2026-10-03T15:30:00Z")));
        // Apia skipped 2011-12-30: midnight that day resolves to midnight on the 31st.
        let tz = chrono_tz::Pacific::Apia;
        let local = NaiveDate::from_ymd_opt(2011, 12, 30)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap();
        let resolved = resolve_local(&tz, local).unwrap();
        assert_eq!(
            resolved.with_timezone(&tz).naive_local().to_string(),
            "2011-12-31 00:00:00"
        );
    }
}
