//! Log sequence numbers and the position ids derived from them.

use std::fmt;
use std::str::FromStr;

/// A PostgreSQL write-ahead-log position. Never a bare integer in this code base,
/// so a byte count can't be mistaken for a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PgLsn(pub u64);

impl PgLsn {
    pub const ZERO: PgLsn = PgLsn(0);
}

impl fmt::Display for PgLsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid LSN {0:?}: expected the X/Y hexadecimal form")]
pub struct ParseLsnError(String);

impl FromStr for PgLsn {
    type Err = ParseLsnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(PgLsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// The deterministic id of one change: the commit LSN of its transaction plus its
/// ordinal inside that transaction. Decoding the same WAL twice gives the same id,
/// and ids increase in commit order, so clients can resume from one.
///
/// Text form: 16 hex digits of LSN, `-`, 8 hex digits of ordinal. Fixed width, so
/// the strings sort like the positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub commit_lsn: PgLsn,
    pub ordinal: u32,
}

impl Position {
    pub const fn new(commit_lsn: PgLsn, ordinal: u32) -> Self {
        Position {
            commit_lsn,
            ordinal,
        }
    }

    /// The greatest position below `self`: "after this" includes `self`.
    pub fn just_before(self) -> Position {
        match self.ordinal {
            0 => Position::new(PgLsn(self.commit_lsn.0.saturating_sub(1)), u32::MAX),
            n => Position::new(self.commit_lsn, n - 1),
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}-{:08X}", self.commit_lsn.0, self.ordinal)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid position id {0:?}: expected 16 hex digits, '-', 8 hex digits")]
pub struct ParsePositionError(String);

impl FromStr for Position {
    type Err = ParsePositionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePositionError(s.to_owned());
        let (lsn, ord) = s.split_once('-').ok_or_else(err)?;
        if lsn.is_empty() || lsn.len() > 16 || ord.is_empty() || ord.len() > 8 {
            return Err(err());
        }
        let lsn = u64::from_str_radix(lsn, 16).map_err(|_| err())?;
        let ord = u32::from_str_radix(ord, 16).map_err(|_| err())?;
        Ok(Position::new(PgLsn(lsn), ord))
    }
}

/// The identity of one change log, created with it. A position means something
/// only in the log that handed it out: a wiped `DATA_DIR` or a recreated slot
/// starts a new epoch, and a `since` from another epoch is answered with `gap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Epoch(pub u32);

impl Epoch {
    /// A fresh random epoch.
    pub fn generate() -> Epoch {
        let id = uuid::Uuid::new_v4();
        let b = id.as_bytes();
        Epoch(u32::from_le_bytes([b[0], b[1], b[2], b[3]]).max(1))
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}", self.0)
    }
}

/// A position as clients see it: the position and the epoch of the log it is in.
/// Text form `<position>.<epoch>`, e.g. `00000000019653D0-00000003.5A1F09C2`; within
/// one epoch the strings still sort like the positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId {
    pub position: Position,
    pub epoch: Epoch,
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.position, self.epoch)
    }
}

/// A `since` as a client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinceId {
    /// `<position>.<epoch>`.
    Stream(StreamId),
    /// A bare position, from before positions carried their log's epoch: which log
    /// it came from is unknowable, so it is answered with `gap`.
    Bare(Position),
}

impl FromStr for SinceId {
    type Err = ParsePositionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('.') {
            None => Ok(SinceId::Bare(s.parse()?)),
            Some((pos, epoch)) => {
                if epoch.is_empty() || epoch.len() > 8 {
                    return Err(ParsePositionError(s.to_owned()));
                }
                let epoch =
                    u32::from_str_radix(epoch, 16).map_err(|_| ParsePositionError(s.to_owned()))?;
                Ok(SinceId::Stream(StreamId {
                    position: pos.parse()?,
                    epoch: Epoch(epoch),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_carry_the_epoch() {
        let id = StreamId {
            position: Position::new(PgLsn(0x0196_53D0), 3),
            epoch: Epoch(0x5A1F_09C2),
        };
        assert_eq!(id.to_string(), "00000000019653D0-00000003.5A1F09C2");
        assert_eq!(
            id.to_string().parse::<SinceId>().unwrap(),
            SinceId::Stream(id)
        );
        assert_eq!(
            "00000000019653D0-00000003".parse::<SinceId>().unwrap(),
            SinceId::Bare(id.position)
        );
        assert!("00000000019653D0-00000003.".parse::<SinceId>().is_err());
        assert!("00000000019653D0-00000003.xyz".parse::<SinceId>().is_err());
    }

    #[test]
    fn lsn_round_trip() {
        let l: PgLsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("nope".parse::<PgLsn>().is_err());
        assert!("1/".parse::<PgLsn>().is_err());
    }

    #[test]
    fn position_text_sorts_like_position() {
        let a = Position::new(PgLsn(0x1_0000_0000), 2);
        let b = Position::new(PgLsn(0x1_0000_0001), 0);
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
        assert_eq!(a.to_string().parse::<Position>().unwrap(), a);
        assert!("0-".parse::<Position>().is_err());
        assert!("zz-1".parse::<Position>().is_err());
    }
}
