//! `strftime_now(format)`, which transformers gives chat templates for
//! "today's date" lines (Llama 3.x: `strftime_now("%d %b %Y")`).
//!
//! Python formats the local time with the C library's `strftime`; this
//! formats UTC (servers usually run in UTC, and it needs no time-zone
//! database) and supports the directives templates use, plus glibc's `-`
//! flag for unpadded numbers (`%-d`). An unknown directive is written out
//! unchanged, as glibc does.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A UTC calendar time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Monday
    weekday: u32,
    /// 1..=366
    day_of_year: u32,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        let jan1 = days_from_civil(year, 1, 1);
        DateTime {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
            // 1970-01-01 was a Thursday.
            weekday: (days + 3).rem_euclid(7) as u32,
            day_of_year: (days - jan1 + 1) as u32,
        }
    }
}

/// Formats the current UTC time.
pub fn strftime_now(format: &str) -> String {
    let secs = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    strftime(format, secs)
}

/// Formats the UTC time `unix_secs` seconds after the epoch.
pub fn strftime(format: &str, unix_secs: i64) -> String {
    let t = DateTime::from_unix(unix_secs);
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.next_if_eq(&'-').is_some();
        let Some(d) = chars.next() else {
            out.push('%');
            if unpadded {
                out.push('-');
            }
            break;
        };
        let num = |out: &mut String, n: i64, width: usize, pad: char| {
            let s = n.to_string();
            if !unpadded {
                for _ in s.len()..width {
                    out.push(pad);
                }
            }
            out.push_str(&s);
        };
        let hour12 = match t.hour % 12 {
            0 => 12,
            h => h,
        };
        match d {
            'Y' => write!(out, "{}", t.year).expect("write to String"),
            'y' => num(&mut out, t.year.rem_euclid(100), 2, '0'),
            'C' => num(&mut out, t.year.div_euclid(100), 2, '0'),
            'm' => num(&mut out, t.month.into(), 2, '0'),
            'd' => num(&mut out, t.day.into(), 2, '0'),
            'e' => num(&mut out, t.day.into(), 2, ' '),
            'j' => num(&mut out, t.day_of_year.into(), 3, '0'),
            'H' => num(&mut out, t.hour.into(), 2, '0'),
            'I' => num(&mut out, hour12.into(), 2, '0'),
            'M' => num(&mut out, t.minute.into(), 2, '0'),
            'S' => num(&mut out, t.second.into(), 2, '0'),
            'u' => num(&mut out, (t.weekday + 1).into(), 1, '0'),
            'w' => num(&mut out, ((t.weekday + 1) % 7).into(), 1, '0'),
            'p' => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            'B' => out.push_str(MONTHS[t.month as usize - 1]),
            'b' | 'h' => out.push_str(&MONTHS[t.month as usize - 1][..3]),
            'A' => out.push_str(DAYS[t.weekday as usize]),
            'a' => out.push_str(&DAYS[t.weekday as usize][..3]),
            'F' => out.push_str(&strftime("%Y-%m-%d", unix_secs)),
            'T' => out.push_str(&strftime("%H:%M:%S", unix_secs)),
            'D' => out.push_str(&strftime("%m/%d/%y", unix_secs)),
            'R' => out.push_str(&strftime("%H:%M", unix_secs)),
            'c' => out.push_str(&strftime("%a %b %e %H:%M:%S %Y", unix_secs)),
            'x' => out.push_str(&strftime("%m/%d/%y", unix_secs)),
            'X' => out.push_str(&strftime("%H:%M:%S", unix_secs)),
            's' => write!(out, "{unix_secs}").expect("write to String"),
            'z' => out.push_str("+0000"),
            'Z' => out.push_str("UTC"),
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            other => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_python() {
        // 2024-07-26 14:05:09 UTC, a Friday. Expected strings are CPython's
        // `datetime.fromtimestamp(t, timezone.utc).strftime(f)` on glibc.
        let t = 1_722_002_709;
        let cases = [
            ("%d %b %Y", "26 Jul 2024"),
            ("%Y-%m-%d %H:%M:%S", "2024-07-26 14:05:09"),
            ("%A, %B %-d, %Y", "Friday, July 26, 2024"),
            ("%a %I:%M %p, day %j, %y", "Fri 02:05 PM, day 208, 24"),
            (
                "%F %T %Z %z %u %w %%",
                "2024-07-26 14:05:09 UTC +0000 5 5 %",
            ),
            ("%-m/%e|%Q|%", "7/26|%Q|%"),
        ];
        for (format, python) in cases {
            assert_eq!(strftime(format, t), python, "{format}");
        }
        assert_eq!(strftime("%a %d %b %Y %H:%M", 0), "Thu 01 Jan 1970 00:00");
        assert_eq!(
            strftime("%Y-%m-%d %a %j", 951_782_400),
            "2000-02-29 Tue 060"
        );
        assert_eq!(strftime("%Y-%m-%d %A", -86_400), "1969-12-31 Wednesday");
    }

    #[test]
    fn calendar_round_trips() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
