//! The `timezone` of a query: an IANA name from the tz database that
//! `chrono-tz` compiles in (so every instance, on any machine, knows the same
//! names), in its canonical spelling.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::OnceLock;

use chrono_tz::Tz;

use super::{InputError, truncate_for_message};

/// A validated timezone; UTC (the default) is `None` inside, because Cube
/// answers in UTC without one and the BI query then omits the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Timezone(Option<Tz>);

/// Names whose offset is zero at every instant: they all ask what UTC asks.
const ALWAYS_UTC: [&str; 18] = [
    "utc",
    "etc/utc",
    "uct",
    "etc/uct",
    "universal",
    "etc/universal",
    "zulu",
    "etc/zulu",
    "gmt",
    "etc/gmt",
    "gmt0",
    "etc/gmt0",
    "gmt+0",
    "etc/gmt+0",
    "gmt-0",
    "etc/gmt-0",
    "greenwich",
    "etc/greenwich",
];

impl Timezone {
    pub const UTC: Timezone = Timezone(None);

    /// An IANA name, matched without regard to case (`america/new_york` is
    /// `America/New_York`); the names of UTC are all UTC.
    pub fn parse(value: &str) -> Result<Timezone, InputError> {
        let unknown = || InputError::UnknownTimezone {
            value: truncate_for_message(value),
        };
        if value.trim().is_empty() || value.len() > 64 {
            return Err(unknown());
        }
        let tz = match Tz::from_str(value) {
            Ok(tz) => tz,
            Err(_) => *by_lower_case_name()
                .get(&value.to_ascii_lowercase())
                .ok_or_else(unknown)?,
        };
        if ALWAYS_UTC.contains(&tz.name().to_ascii_lowercase().as_str()) {
            return Ok(Timezone::UTC);
        }
        Ok(Timezone(Some(tz)))
    }

    /// The canonical name: `UTC`, or the database's own spelling.
    pub fn name(self) -> &'static str {
        self.0.map_or("UTC", |tz| tz.name())
    }

    /// What the BI query carries: nothing for UTC.
    pub fn as_cube(self) -> Option<&'static str> {
        self.0.map(|tz| tz.name())
    }
}

fn by_lower_case_name() -> &'static HashMap<String, Tz> {
    static NAMES: OnceLock<HashMap<String, Tz>> = OnceLock::new();
    NAMES.get_or_init(|| {
        chrono_tz::TZ_VARIANTS
            .iter()
            .map(|tz| (tz.name().to_ascii_lowercase(), *tz))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_canonical_and_utc_is_one() {
        let name = |value: &str| Timezone::parse(value).map(Timezone::name);
        assert_eq!(name("America/New_York"), Ok("America/New_York"));
        assert_eq!(name("america/new_york"), Ok("America/New_York"));
        assert_eq!(name("ASIA/KOLKATA"), Ok("Asia/Kolkata"));
        for utc in ["UTC", "utc", "Etc/UTC", "Zulu", "GMT", "Etc/GMT+0"] {
            assert_eq!(Timezone::parse(utc), Ok(Timezone::UTC), "{utc}");
        }
        assert_eq!(Timezone::UTC.as_cube(), None);
        assert_eq!(
            Timezone::parse("Europe/Paris").map(Timezone::as_cube),
            Ok(Some("Europe/Paris"))
        );
        for bad in [
            "",
            "  ",
            "Mars/Olympus",
            "New York",
            "+05:00",
            "America/New_York ",
        ] {
            assert!(Timezone::parse(bad).is_err(), "{bad:?}");
        }
    }
}
