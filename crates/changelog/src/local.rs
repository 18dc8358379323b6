//! The local change log: append-only segment files under one directory.
//!
//! Layout:
//! - `meta`: `epoch floor [reset-pending]` as text, replaced atomically (write,
//!   fsync, rename). `reset-pending` is written before the replication slot is
//!   (re)created, so a crash between the two still resets the log at the next start.
//! - `relations`: one record per relation version (table definition) ever logged.
//! - `<first position>.seg`: a 16-byte header (magic, epoch) then records, each
//!   `[body length u32][CRC-32 of body u32][body]`, positions strictly increasing.
//!
//! Recovery (at open): the last segment and the relations file are read to the end
//! and cut at the first record that is short or fails its CRC: a torn tail is
//! truncated, never served. A whole record naming a relation that was never
//! logged is corruption (relations are fsynced before any change uses them), and
//! so is a bad record anywhere a reader meets it before the newest change: both
//! are errors, not silently skipped. Segments of another epoch are leftovers of
//! an interrupted reset and are removed. Sealed segments were fsynced before the
//! next one was created.
//!
//! Failures: an append that fails is rolled back (the file cut to where the batch
//! began) and may be retried; a failed fsync is not retried (the kernel may have
//! dropped the dirty pages), the caller stops and recovery starts over.
//!
//! Why plain segment files and not an embedded database: the log is written in
//! position order and read as ranges, never updated in place; a B-tree or LSM
//! would add write amplification and a second journal for nothing. See
//! docs/decisions.md for the measurements.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use super::codec::{self, CodecError};
use super::{Bounds, ChangeLog, LogError, Page, ReadHint};
use aether_core::changes::{Relation, RowChange, TableId};
use aether_core::lsn::{Epoch, PgLsn, Position};

const MAGIC: &[u8; 8] = b"AETHLOG\x01";
const HEADER: u64 = 16;
/// The length field is 32 bits; a length beyond what is left of the file is a
/// torn or corrupt record (never a huge allocation).
const MAX_RECORD: usize = u32::MAX as usize;
/// A segment's sparse index has an entry every this many bytes: a `since`
/// lookup scans at most this much of its segment.
const INDEX_EVERY: u64 = 64 << 10;

/// (position of the record at `offset`, `offset`), in order.
type SparseIndex = Vec<(Position, u64)>;

#[derive(Debug, Clone)]
pub struct LogOptions {
    /// A segment is sealed and a new one started past this size.
    pub segment_bytes: u64,
    /// Oldest segments are dropped while the log is larger than this.
    pub retention_bytes: u64,
    /// Segments whose newest change was logged longer ago than this are dropped.
    pub retention_age: Duration,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 16 << 20,
            retention_bytes: 1 << 30,
            retention_age: Duration::from_secs(86_400),
        }
    }
}

#[derive(Debug, Clone)]
struct Segment {
    first: Position,
    path: PathBuf,
    bytes: u64,
    /// When its last record was written (for age retention, without a syscall).
    sealed_at: SystemTime,
    /// Built while it was written, or at its first lookup after a restart.
    index: Option<Arc<SparseIndex>>,
}

struct Active {
    first: Position,
    file: Arc<File>,
    out: BufWriter<SharedFile>,
    bytes: u64,
    index: SparseIndex,
}

impl Active {
    fn new(first: Position, file: File, bytes: u64, index: SparseIndex) -> Active {
        let file = Arc::new(file);
        Active {
            first,
            out: BufWriter::with_capacity(256 << 10, SharedFile(Arc::clone(&file))),
            file,
            bytes,
            index,
        }
    }

    /// Notes a record about to be written at the end, if the index is due one.
    fn index_next(&mut self, position: Position) {
        let due = self
            .index
            .last()
            .is_none_or(|(_, at)| self.bytes >= at + INDEX_EVERY);
        if due {
            self.index.push((position, self.bytes));
        }
    }
}

/// A file written through a buffer on one thread and fsynced on another.
struct SharedFile(Arc<File>);

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (&*self.0).flush()
    }
}

struct State {
    epoch: Epoch,
    /// The slot is being (re)created: the log must be reset before it is used.
    pending: bool,
    floor: Position,
    newest: Option<Position>,
    /// Sealed segments, oldest first (the active one is not in here).
    sealed: Vec<Segment>,
    active: Option<Active>,
    records: u64,
    relations_out: BufWriter<SharedFile>,
    relations_file: Arc<File>,
    /// The latest logged version of each table's definition.
    latest: HashMap<TableId, (Arc<Relation>, u32)>,
    scratch: Vec<u8>,
}

pub struct LocalLog {
    dir: PathBuf,
    opts: LogOptions,
    state: Mutex<State>,
    /// What `bounds()` answers, updated under `state` and read without it: the
    /// router asks often and must never wait behind an fsync.
    snapshot: RwLock<Bounds>,
    /// Relation versions, readable without the writer's lock.
    relations: RwLock<Vec<Option<Arc<Relation>>>>,
}

fn segment_name(first: Position) -> String {
    format!("{first}.seg")
}

fn crc(body: &[u8]) -> u32 {
    crc32fast::hash(body)
}

fn write_record(out: &mut impl Write, body: &[u8]) -> std::io::Result<u64> {
    out.write_all(&(body.len() as u32).to_le_bytes())?;
    out.write_all(&crc(body).to_le_bytes())?;
    out.write_all(body)?;
    Ok(8 + body.len() as u64)
}

#[derive(Debug, PartialEq, Eq)]
enum Next {
    Record,
    /// A clean end, at a record boundary.
    End,
    /// A short header or body, a bad CRC, a length past the end of the file.
    Torn,
}

/// Reads the next record into `body`; `left` is what remains of the file.
fn read_record(r: &mut impl Read, body: &mut Vec<u8>, left: u64) -> std::io::Result<Next> {
    let mut head = [0u8; 8];
    match read_some(r, &mut head)? {
        0 => return Ok(Next::End),
        8 => {}
        _ => return Ok(Next::Torn),
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let sum = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_RECORD || len as u64 > left.saturating_sub(8) {
        return Ok(Next::Torn);
    }
    body.clear();
    body.resize(len, 0);
    if !read_full(r, body)? || crc(body) != sum {
        return Ok(Next::Torn);
    }
    Ok(Next::Record)
}

/// Reads until `buf` is full or the reader ends; how many bytes were read.
fn read_some(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}

/// Fills `buf`; `Ok(false)` if the reader ends first.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    Ok(read_some(r, buf)? == buf.len())
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(LogError::io(format!("fsync {}", dir.display())))
}

fn write_meta(dir: &Path, epoch: Epoch, floor: Position, pending: bool) -> Result<(), LogError> {
    let tmp = dir.join("meta.tmp");
    let text = format!(
        "{} {}{}\n",
        epoch,
        floor,
        if pending { " reset-pending" } else { "" }
    );
    let mut f = File::create(&tmp).map_err(LogError::io("writing meta"))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(LogError::io("writing meta"))?;
    fs::rename(&tmp, dir.join("meta")).map_err(LogError::io("replacing meta"))?;
    sync_dir(dir)
}

fn read_meta(dir: &Path) -> Result<Option<(Epoch, Position, bool)>, LogError> {
    let text = match fs::read_to_string(dir.join("meta")) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::io("reading meta")(e)),
    };
    let bad = || LogError::Corrupt {
        segment: "meta".into(),
        offset: 0,
        why: format!("unreadable: {text:?}"),
    };
    let mut words = text.split_whitespace();
    let epoch = words.next().ok_or_else(bad)?;
    let floor = words.next().ok_or_else(bad)?;
    let pending = match words.next() {
        None => false,
        Some("reset-pending") => true,
        Some(_) => return Err(bad()),
    };
    let epoch = u32::from_str_radix(epoch, 16).map_err(|_| bad())?;
    let floor = floor.parse().map_err(|_| bad())?;
    Ok(Some((Epoch(epoch), floor, pending)))
}

fn open_append(path: &Path) -> Result<File, LogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(LogError::io(format!("opening {}", path.display())))
}

#[derive(Debug, PartialEq, Eq)]
enum Header {
    Ok,
    /// Short or zeroed: a segment created as the process or the host died.
    Torn,
    /// A segment of another epoch: a leftover of an interrupted reset.
    OtherEpoch,
}

fn read_header(r: &mut impl Read, epoch: Epoch, path: &Path) -> Result<Header, LogError> {
    let mut head = [0u8; HEADER as usize];
    if !read_full(r, &mut head).map_err(LogError::io(format!("reading {}", path.display())))? {
        return Ok(Header::Torn);
    }
    if head.iter().all(|b| *b == 0) {
        return Ok(Header::Torn);
    }
    if &head[..8] != MAGIC {
        return Err(LogError::Corrupt {
            segment: path.display().to_string(),
            offset: 0,
            why: "not a change log segment".into(),
        });
    }
    if head[8..12] != epoch.0.to_le_bytes() {
        return Ok(Header::OtherEpoch);
    }
    Ok(Header::Ok)
}

/// A reader's check: anything but a good header of this epoch is an error.
fn check_header(r: &mut impl Read, epoch: Epoch, path: &Path) -> Result<(), LogError> {
    match read_header(r, epoch, path)? {
        Header::Ok => Ok(()),
        h => Err(LogError::Corrupt {
            segment: path.display().to_string(),
            offset: 0,
            why: format!("bad segment header ({h:?})"),
        }),
    }
}

fn header(epoch: Epoch) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&epoch.0.to_le_bytes());
    h
}

impl LocalLog {
    /// Opens (recovering a torn tail) or creates the log in `dir`. A new log is
    /// created reset-pending: the caller resets it once the slot's position is
    /// known ([`ChangeLog::reset`]). Returns whether it was created.
    pub fn open(
        dir: &Path,
        opts: LogOptions,
        new_floor: Position,
    ) -> Result<(LocalLog, bool), LogError> {
        fs::create_dir_all(dir).map_err(LogError::io(format!("creating {}", dir.display())))?;
        let (meta, created) = match read_meta(dir)? {
            Some(m) => (m, false),
            None => {
                // Leftovers of a log whose meta never got written belong to no epoch.
                remove_segments(dir, None)?;
                let _ = fs::remove_file(dir.join("relations"));
                let m = (Epoch::generate(), new_floor, true);
                write_meta(dir, m.0, m.1, m.2)?;
                (m, true)
            }
        };
        let (epoch, floor, pending) = meta;

        // Relations first: the last segment's recovery checks records against them.
        let rel_path = dir.join("relations");
        let mut versions: Vec<Option<Arc<Relation>>> = Vec::new();
        let mut latest = HashMap::new();
        let rel_file = open_append(&rel_path)?;
        let rel_len = rel_file
            .metadata()
            .map_err(LogError::io("reading relations"))?
            .len();
        let mut good = 0u64;
        {
            let mut r = BufReader::new(&rel_file);
            let mut body = Vec::new();
            // A torn tail is a relation write cut by a crash: no change uses it.
            while read_record(&mut r, &mut body, rel_len - good)
                .map_err(LogError::io("reading relations"))?
                == Next::Record
            {
                let (v, rel) =
                    codec::decode_relation(&body).map_err(|e| corrupt(&rel_path, good, e))?;
                let rel = Arc::new(rel);
                let i = v as usize;
                if versions.len() <= i {
                    versions.resize(i + 1, None);
                }
                versions[i] = Some(Arc::clone(&rel));
                latest.insert(rel.id, (rel, v));
                good += 8 + body.len() as u64;
            }
        }
        rel_file
            .set_len(good)
            .and_then(|()| rel_file.sync_all())
            .map_err(LogError::io("truncating relations"))?;

        // Segments of another epoch are what an interrupted reset left behind.
        remove_segments(dir, Some(epoch))?;
        let mut names: Vec<(Position, PathBuf)> = fs::read_dir(dir)
            .map_err(LogError::io("listing the log"))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let first = name.strip_suffix(".seg")?.parse().ok()?;
                Some((first, e.path()))
            })
            .collect();
        names.sort_by_key(|(p, _)| *p);

        let mut sealed = Vec::new();
        for (first, path) in &names {
            let meta =
                fs::metadata(path).map_err(LogError::io(format!("reading {}", path.display())))?;
            sealed.push(Segment {
                first: *first,
                path: path.clone(),
                bytes: meta.len(),
                sealed_at: meta.modified().unwrap_or_else(|_| SystemTime::now()),
                index: None,
            });
        }
        // The last segment may end in a torn record: scan and cut it there.
        let mut newest = None;
        let mut records = 0u64;
        let mut active = None;
        if let Some(last) = sealed.pop() {
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .open(&last.path)
                .map_err(LogError::io(format!("opening {}", last.path.display())))?;
            let (end, count, last_pos, index) = scan_tail(&file, epoch, &last.path, |v| {
                versions.get(v as usize).is_some_and(|r| r.is_some())
            })?;
            file.set_len(end)
                .and_then(|()| file.sync_all())
                .map_err(LogError::io(format!("truncating {}", last.path.display())))?;
            if end < HEADER {
                (&file)
                    .write_all(&header(epoch))
                    .and_then(|()| file.sync_all())
                    .map_err(LogError::io("rewriting a segment header"))?;
            }
            records += count;
            newest = last_pos;
            active = Some(Active::new(last.first, file, end.max(HEADER), index));
        }
        if newest.is_none() {
            // The active segment is empty: the newest change is in the one before.
            if let Some(prev) = sealed.last() {
                let file = File::open(&prev.path)
                    .map_err(LogError::io(format!("opening {}", prev.path.display())))?;
                let (end, _, last_pos, _) = scan_tail(&file, epoch, &prev.path, |_| true)?;
                if end < prev.bytes {
                    return Err(LogError::Corrupt {
                        segment: prev.path.display().to_string(),
                        offset: end,
                        why: "a sealed segment ends in a bad record".into(),
                    });
                }
                newest = last_pos;
            }
        }
        sync_dir(dir)?;
        let state = State {
            epoch,
            pending,
            floor,
            newest,
            sealed,
            active,
            records,
            relations_out: BufWriter::new(SharedFile(Arc::new(
                rel_file.try_clone().map_err(LogError::io("relations"))?,
            ))),
            relations_file: Arc::new(rel_file),
            latest,
            scratch: Vec::with_capacity(4096),
        };
        let log = LocalLog {
            dir: dir.to_owned(),
            opts,
            snapshot: RwLock::new(bounds_of(&state)),
            relations: RwLock::new(versions),
            state: Mutex::new(state),
        };
        Ok((log, created))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent files behind (records
        // are appended whole or cut at recovery); keep going with the state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes what `bounds()` answers; called with the state locked.
    fn publish(&self, st: &State) {
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = bounds_of(st);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The logged version of `rel`, logging it first if it is new. Rare (once per
    /// table definition), so its fsync under the lock is accepted.
    fn relation_version(&self, st: &mut State, rel: &Arc<Relation>) -> Result<u32, LogError> {
        if let Some((known, v)) = st.latest.get(&rel.id)
            && (Arc::ptr_eq(known, rel) || **known == **rel)
        {
            let v = *v;
            st.latest.insert(rel.id, (Arc::clone(rel), v));
            return Ok(v);
        }
        let mut versions = self.relations.write().unwrap_or_else(|e| e.into_inner());
        let v = versions.len() as u32;
        let mut body = Vec::new();
        codec::encode_relation(v, rel, &mut body);
        write_record(&mut st.relations_out, &body)
            .and_then(|_| st.relations_out.flush())
            .and_then(|()| st.relations_file.sync_data())
            .map_err(LogError::io("appending a relation"))?;
        versions.push(Some(Arc::clone(rel)));
        st.latest.insert(rel.id, (Arc::clone(rel), v));
        Ok(v)
    }

    /// Seals the active segment (fsynced) and starts one whose first change is `first`.
    fn rotate(&self, st: &mut State, first: Position) -> Result<(), LogError> {
        if let Some(a) = st.active.as_mut() {
            a.out.flush().map_err(LogError::io("sealing a segment"))?;
            a.file
                .sync_data()
                .map_err(|e| LogError::Fsync(e.to_string()))?;
        }
        if let Some(a) = st.active.take() {
            st.sealed.push(Segment {
                first: a.first,
                path: self.dir.join(segment_name(a.first)),
                bytes: a.bytes,
                sealed_at: SystemTime::now(),
                index: Some(Arc::new(a.index)),
            });
        }
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .read(true)
            .open(&path)
            .map_err(LogError::io(format!("creating {}", path.display())))?;
        (&file)
            .write_all(&header(st.epoch))
            .map_err(LogError::io("writing a segment header"))?;
        sync_dir(&self.dir)?;
        st.active = Some(Active::new(first, file, HEADER, Vec::new()));
        Ok(())
    }

    /// Writes `changes`, rotating segments as they fill. `mark` is where an
    /// undo goes back to: moved forward at each rotation (a sealed segment is
    /// fsynced and whole), so a failure keeps what was sealed and cuts the rest.
    fn write_batch(
        &self,
        st: &mut State,
        changes: &[Arc<RowChange>],
        mark: &mut (Option<Position>, u64, u64),
    ) -> Result<(), LogError> {
        for c in changes {
            if let Some(newest) = st.newest
                && c.position <= newest
            {
                return Err(LogError::OutOfOrder {
                    position: c.position,
                    newest,
                });
            }
            let full = st
                .active
                .as_ref()
                .is_none_or(|a| a.bytes >= self.opts.segment_bytes);
            if full {
                self.rotate(st, c.position)?;
                *mark = (st.newest, st.records, HEADER);
            }
            let version = self.relation_version(st, &c.relation)?;
            let mut body = std::mem::take(&mut st.scratch);
            body.clear();
            codec::encode_change(c, version, &mut body);
            let n = body.len();
            let written = match st.active.as_mut() {
                Some(active) if n <= MAX_RECORD => {
                    active.index_next(c.position);
                    let w = write_record(&mut active.out, &body).map_err(LogError::io("appending"));
                    if let Ok(w) = w {
                        active.bytes += w;
                    }
                    w.map(|_| ())
                }
                Some(_) => Err(LogError::TooLarge(n)),
                None => Err(LogError::Corrupt {
                    segment: "active".into(),
                    offset: 0,
                    why: "no active segment".into(),
                }),
            };
            // A huge record's buffer is not kept for the next.
            if body.capacity() <= 1 << 20 {
                st.scratch = body;
            }
            written?;
            st.newest = Some(c.position);
            st.records += 1;
        }
        // In the operating system from here on: a killed process loses nothing.
        if let Some(a) = st.active.as_mut() {
            a.out.flush().map_err(LogError::io("appending"))?;
        }
        Ok(())
    }

    /// Goes back to `mark` after a failed append: what is buffered is dropped and
    /// the active segment cut to where it stood.
    fn undo(&self, st: &mut State, mark: (Option<Position>, u64, u64)) -> Result<(), LogError> {
        let (newest, records, bytes) = mark;
        st.newest = newest;
        st.records = records;
        if let Some(a) = st.active.as_mut() {
            let file = Arc::clone(&a.file);
            let _ = std::mem::replace(
                &mut a.out,
                BufWriter::with_capacity(256 << 10, SharedFile(Arc::clone(&file))),
            )
            .into_parts();
            file.set_len(bytes)
                .map_err(|e| LogError::Fsync(format!("undoing a failed append: {e}")))?;
            a.bytes = bytes;
            a.index.retain(|(_, at)| *at < bytes);
        }
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn snapshot_segments(
        &self,
    ) -> (
        Epoch,
        Position,
        Option<Position>,
        Vec<(Position, PathBuf, Option<Arc<SparseIndex>>)>,
    ) {
        let st = self.state();
        let mut segs: Vec<_> = st
            .sealed
            .iter()
            .map(|s| (s.first, s.path.clone(), s.index.clone()))
            .collect();
        if let Some(a) = &st.active {
            segs.push((
                a.first,
                self.dir.join(segment_name(a.first)),
                Some(Arc::new(a.index.clone())),
            ));
        }
        (st.epoch, st.floor, st.newest, segs)
    }

    /// The sparse index of a sealed segment written before this process started:
    /// built by one scan at its first lookup, then kept.
    fn index_of(
        &self,
        first: Position,
        path: &Path,
        epoch: Epoch,
    ) -> Result<Arc<SparseIndex>, LogError> {
        let file = File::open(path).map_err(LogError::io(format!("reading {}", path.display())))?;
        let (_, _, _, index) = scan_tail(&file, epoch, path, |_| true)?;
        let index = Arc::new(index);
        let mut st = self.state();
        if let Some(s) = st.sealed.iter_mut().find(|s| s.first == first) {
            s.index = Some(Arc::clone(&index));
        }
        Ok(index)
    }
}

fn bounds_of(st: &State) -> Bounds {
    let bytes =
        st.sealed.iter().map(|s| s.bytes).sum::<u64>() + st.active.as_ref().map_or(0, |a| a.bytes);
    let oldest = st.newest.map(|_| {
        st.sealed
            .first()
            .map(|s| s.first)
            .or(st.active.as_ref().map(|a| a.first))
            .unwrap_or(st.floor)
    });
    Bounds {
        epoch: st.epoch,
        floor: st.floor,
        newest: st.newest,
        oldest,
        bytes,
        records: st.records,
        reset_pending: st.pending,
    }
}

/// Scans a segment to its end: (end of the last good record, records, last
/// position, sparse index). Stops at a torn record; a whole record naming a
/// relation that was never logged, or out of order, is corruption.
fn scan_tail(
    file: &File,
    epoch: Epoch,
    path: &Path,
    known_relation: impl Fn(u32) -> bool,
) -> Result<(u64, u64, Option<Position>, SparseIndex), LogError> {
    let len = file
        .metadata()
        .map_err(LogError::io(format!("reading {}", path.display())))?
        .len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    r.seek(SeekFrom::Start(0))
        .map_err(LogError::io(format!("reading {}", path.display())))?;
    match read_header(&mut r, epoch, path)? {
        Header::Ok => {}
        Header::Torn => return Ok((0, 0, None, Vec::new())),
        Header::OtherEpoch => {
            return Err(LogError::Corrupt {
                segment: path.display().to_string(),
                offset: 0,
                why: "a segment of another epoch".into(),
            });
        }
    }
    let mut end = HEADER;
    let mut count = 0;
    let mut last = None;
    let mut index: SparseIndex = Vec::new();
    let mut body = Vec::new();
    while read_record(&mut r, &mut body, len - end)
        .map_err(LogError::io(format!("reading {}", path.display())))?
        == Next::Record
    {
        let pos = codec::change_position(&body).map_err(|e| corrupt(path, end, e))?;
        let version = body
            .get(codec::POSITION_AT + 20..codec::POSITION_AT + 24)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if !version.is_some_and(&known_relation) {
            return Err(LogError::Corrupt {
                segment: path.display().to_string(),
                offset: end,
                why: format!("a change names relation version {version:?}, which is not logged"),
            });
        }
        if last.is_some_and(|l| pos <= l) {
            return Err(LogError::Corrupt {
                segment: path.display().to_string(),
                offset: end,
                why: format!("position {pos} out of order"),
            });
        }
        if index.last().is_none_or(|(_, at)| end >= at + INDEX_EVERY) {
            index.push((pos, end));
        }
        last = Some(pos);
        count += 1;
        end += 8 + body.len() as u64;
    }
    Ok((end, count, last, index))
}

/// Removes segments: all of them, or (`keep`) those not of that epoch.
fn remove_segments(dir: &Path, keep: Option<Epoch>) -> Result<(), LogError> {
    for e in fs::read_dir(dir)
        .map_err(LogError::io("listing the log"))?
        .flatten()
    {
        if !e.file_name().to_string_lossy().ends_with(".seg") {
            continue;
        }
        if let Some(epoch) = keep {
            let Ok(mut f) = File::open(e.path()) else {
                continue;
            };
            if read_header(&mut f, epoch, &e.path())? != Header::OtherEpoch {
                continue;
            }
            tracing::warn!(segment = %e.path().display(), "change log: removing a segment of an earlier epoch (an interrupted reset)");
        }
        fs::remove_file(e.path()).map_err(LogError::io("removing a segment"))?;
    }
    sync_dir(dir)
}

impl ChangeLog for LocalLog {
    fn bounds(&self) -> Bounds {
        *self.snapshot.read().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, changes: &[Arc<RowChange>]) -> Result<(), LogError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut st = self.state();
        if st.pending {
            return Err(LogError::ResetPending);
        }
        let mut mark = (
            st.newest,
            st.records,
            st.active.as_ref().map_or(HEADER, |a| a.bytes),
        );
        let result = self.write_batch(&mut st, changes, &mut mark);
        if let Err(e) = result {
            // What was sealed in this batch stays (whole and fsynced); the caller
            // retries what is above `newest`.
            self.undo(&mut st, mark)?;
            self.publish(&st);
            return Err(e);
        }
        self.publish(&st);
        Ok(())
    }

    fn sync(&self) -> Result<(), LogError> {
        let file = self.state().active.as_ref().map(|a| Arc::clone(&a.file));
        // Outside the lock: appends go on while the disk catches up. A failure is
        // not retried: the kernel may have dropped the pages it could not write.
        if let Some(f) = file {
            f.sync_data().map_err(|e| LogError::Fsync(e.to_string()))?;
        }
        Ok(())
    }

    fn read_after(
        &self,
        after: Position,
        max_bytes: usize,
        max_changes: usize,
        hint: Option<&ReadHint>,
    ) -> Result<Page, LogError> {
        let (epoch, floor, newest, segs) = self.snapshot_segments();
        if after < floor {
            return Err(LogError::Gap {
                since: after,
                floor,
            });
        }
        let Some(newest) = newest else {
            return Ok(Page {
                end: true,
                ..Page::default()
            });
        };
        if after >= newest {
            return Ok(Page {
                end: true,
                ..Page::default()
            });
        }
        // The segment holding the first change after `after`.
        let mut i = segs
            .partition_point(|(first, _, _)| *first <= after)
            .saturating_sub(1);
        let mut offset = HEADER;
        if let Some(h) = hint
            && h.last <= after
            && let Some(j) = segs.iter().position(|(first, _, _)| *first == h.segment)
            && j >= i
        {
            i = j;
            offset = h.offset;
        } else if let Some((first, path, index)) = segs.get(i) {
            // No hint: start at the last indexed record at or before `after`.
            let index = match index {
                Some(index) => Arc::clone(index),
                None => match self.index_of(*first, path, epoch) {
                    Ok(index) => index,
                    // Dropped by retention since the snapshot.
                    Err(LogError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        return Err(LogError::Gap {
                            since: after,
                            floor: self.bounds().floor,
                        });
                    }
                    Err(e) => return Err(e),
                },
            };
            let k = index.partition_point(|(p, _)| *p <= after);
            if k > 0 {
                offset = index[k - 1].1;
            }
        }
        let relations = self
            .relations
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut page = Page::default();
        let mut read = 0usize;
        let mut body = Vec::new();
        while i < segs.len() {
            let (first, path, _) = &segs[i];
            let file = match File::open(path) {
                Ok(f) => f,
                // Dropped by retention since the snapshot.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(LogError::Gap {
                        since: after,
                        floor: self.bounds().floor,
                    });
                }
                Err(e) => return Err(LogError::io(format!("reading {}", path.display()))(e)),
            };
            let len = file
                .metadata()
                .map_err(LogError::io(format!("reading {}", path.display())))?
                .len();
            let mut r = BufReader::with_capacity(256 << 10, file);
            if offset == HEADER {
                check_header(&mut r, epoch, path)?;
            } else {
                r.seek(SeekFrom::Start(offset))
                    .map_err(LogError::io(format!("reading {}", path.display())))?;
            }
            loop {
                let next = read_record(&mut r, &mut body, len.saturating_sub(offset))
                    .map_err(LogError::io(format!("reading {}", path.display())))?;
                match next {
                    Next::Record => {}
                    Next::End => break,
                    // Everything up to `newest` was whole when the snapshot was
                    // taken: a bad record here is corruption, never skipped.
                    Next::Torn => {
                        return Err(LogError::Corrupt {
                            segment: path.display().to_string(),
                            offset,
                            why: "a bad record before the newest change".into(),
                        });
                    }
                }
                offset += 8 + body.len() as u64;
                let pos = codec::change_position(&body).map_err(|e| corrupt(path, offset, e))?;
                if pos <= after {
                    continue;
                }
                if pos > newest {
                    // Appended after the snapshot: the next page gets it.
                    break;
                }
                let change = codec::decode_change(&body, epoch, |v| {
                    relations.get(v as usize).cloned().flatten()
                })
                .map_err(|e| corrupt(path, offset, e))?;
                read += body.len();
                page.changes.push(Arc::new(change));
                page.hint = Some(ReadHint {
                    segment: *first,
                    offset,
                    last: pos,
                });
                if pos == newest {
                    page.end = true;
                    return Ok(page);
                }
                if read >= max_bytes || page.changes.len() >= max_changes.max(1) {
                    return Ok(page);
                }
            }
            i += 1;
            offset = HEADER;
        }
        page.end = true;
        Ok(page)
    }

    fn enforce_retention(&self, now: SystemTime) -> Result<(), LogError> {
        // Decide under the lock (no i/o). Segments are removed only here, from
        // the front; the plan is checked again once the lock is taken back.
        let (gone_last, dropped, epoch) = {
            let st = self.state();
            let mut total = st.sealed.iter().map(|s| s.bytes).sum::<u64>()
                + st.active.as_ref().map_or(0, |a| a.bytes);
            let mut dropped = 0;
            for s in &st.sealed {
                let old = now
                    .duration_since(s.sealed_at)
                    .is_ok_and(|age| age > self.opts.retention_age);
                if !(old || total > self.opts.retention_bytes) {
                    break;
                }
                total -= s.bytes;
                dropped += 1;
            }
            if dropped == 0 {
                return Ok(());
            }
            (st.sealed[dropped - 1].path.clone(), dropped, st.epoch)
        };
        // The floor is exactly the last change dropped: a client that saw it
        // resumes without a gap.
        let file = File::open(&gone_last)
            .map_err(LogError::io(format!("reading {}", gone_last.display())))?;
        let (_, _, last, _) = scan_tail(&file, epoch, &gone_last, |_| true)?;
        let mut st = self.state();
        // A reset in between: the plan no longer applies.
        if st.epoch != epoch || st.sealed.get(dropped - 1).map(|s| &s.path) != Some(&gone_last) {
            return Ok(());
        }
        let floor = match last {
            Some(last) => st.floor.max(last),
            None => st.floor,
        };
        write_meta(&self.dir, st.epoch, floor, st.pending)?;
        st.floor = floor;
        let gone: Vec<Segment> = st.sealed.drain(..dropped).collect();
        self.publish(&st);
        drop(st);
        for s in gone {
            tracing::info!(segment = %s.path.display(), bytes = s.bytes, "change log: segment past retention dropped");
            fs::remove_file(&s.path).map_err(LogError::io("removing a segment"))?;
        }
        Ok(())
    }

    fn mark_reset_pending(&self) -> Result<(), LogError> {
        let mut st = self.state();
        write_meta(&self.dir, st.epoch, st.floor, true)?;
        st.pending = true;
        self.publish(&st);
        Ok(())
    }

    fn reset(&self, floor: Position) -> Result<Epoch, LogError> {
        let mut st = self.state();
        let epoch = Epoch::generate();
        // The new epoch first: segments of the old one left by a crash here are
        // removed at the next open.
        write_meta(&self.dir, epoch, floor, false)?;
        st.active = None;
        st.sealed.clear();
        st.epoch = epoch;
        st.pending = false;
        st.floor = floor;
        st.newest = None;
        st.records = 0;
        self.publish(&st);
        remove_segments(&self.dir, None)?;
        Ok(epoch)
    }
}

fn corrupt(path: &Path, offset: u64, e: CodecError) -> LogError {
    LogError::Corrupt {
        segment: path.display().to_string(),
        offset,
        why: e.to_string(),
    }
}

/// The first position a new log's history may start after, given the slot's
/// confirmed position: a transaction committed at `confirmed` itself is still
/// re-sent, so the floor is just below it.
pub fn floor_for_slot(confirmed: PgLsn) -> Position {
    Position::new(PgLsn(confirmed.0.saturating_sub(1)), u32::MAX)
}

/// Opens the log and, if it is new, resets it to start after `floor` at once
/// (tests and benchmarks, which have no slot to wait for).
pub fn open_ready(
    dir: &Path,
    opts: LogOptions,
    floor: Position,
) -> Result<(LocalLog, bool), LogError> {
    let (log, created) = LocalLog::open(dir, opts, floor)?;
    if log.bounds().reset_pending {
        log.reset(floor)?;
    }
    Ok((log, created))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aether_core::changes::{ChangeKind, Column};
    use serde_json::json;

    fn rel() -> Arc<Relation> {
        Arc::new(Relation {
            id: TableId(1),
            schema: "public".into(),
            name: "t".into(),
            qualified: Arc::from("public.t"),
            replica_identity: b'f',
            columns: vec![Column {
                name: "v".into(),
                type_oid: 25,
                is_key: true,
                secret: false,
            }],
        })
    }

    fn change(rel: &Arc<Relation>, lsn: u64, ord: u32) -> Arc<RowChange> {
        Arc::new(RowChange::new(
            Position::new(PgLsn(lsn), ord),
            ChangeKind::Insert,
            Arc::clone(rel),
            Some(vec![Some(json!(format!(
                "value {lsn}/{ord} {}",
                "x".repeat(50)
            )))]),
            None,
            0,
        ))
    }

    fn small() -> LogOptions {
        LogOptions {
            segment_bytes: 1024,
            retention_bytes: 1 << 30,
            retention_age: Duration::from_secs(3600),
        }
    }

    fn all_after(log: &LocalLog, after: Position) -> Vec<Position> {
        let mut out = Vec::new();
        let mut hint = None;
        let mut at = after;
        loop {
            let page = log.read_after(at, 300, usize::MAX, hint.as_ref()).unwrap();
            out.extend(page.changes.iter().map(|c| c.position));
            if let Some(last) = page.changes.last() {
                at = last.position;
            }
            hint = page.hint;
            if page.end {
                return out;
            }
        }
    }

    fn fresh(opts: LogOptions) -> (tempfile::TempDir, LocalLog) {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = open_ready(dir.path(), opts, floor_for_slot(PgLsn(100))).unwrap();
        (dir, log)
    }

    #[test]
    fn conformance() {
        use crate::conformance::*;
        for opts in [small(), LogOptions::default()] {
            let (_d, log) = fresh(opts.clone());
            appends_read_back_in_order_with_their_values(&log);
            let (_d, log) = fresh(opts.clone());
            appends_are_refused_out_of_order_and_old_positions_are_gaps(&log);
            let (_d, log) = fresh(opts);
            a_reset_starts_a_new_epoch_after_its_floor(&log);
        }
    }

    #[test]
    fn appends_read_back_across_segments_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let floor = floor_for_slot(PgLsn(100));
        let (log, created) = open_ready(dir.path(), small(), floor).unwrap();
        assert!(created);
        let r = rel();
        let changes: Vec<_> = (1..=60)
            .map(|i| change(&r, 100 * i, (i % 3) as u32))
            .collect();
        log.append(&changes[..30]).unwrap();
        log.append(&changes[30..]).unwrap();
        log.sync().unwrap();
        assert!(log.state().sealed.len() > 3, "small segments rotate");
        let want: Vec<_> = changes.iter().map(|c| c.position).collect();
        assert_eq!(all_after(&log, floor), want);
        assert_eq!(all_after(&log, want[41]), want[42..]);
        // Out of order is refused; older is a gap.
        assert!(log.append(&changes[..1]).is_err());
        assert!(matches!(
            log.read_after(Position::new(PgLsn(5), 0), 100, usize::MAX, None),
            Err(LogError::Gap { .. })
        ));
        let epoch = log.bounds().epoch;
        drop(log);

        let (log, created) = open_ready(dir.path(), small(), floor).unwrap();
        assert!(!created);
        let b = log.bounds();
        assert_eq!(b.epoch, epoch);
        assert_eq!(b.newest, Some(want[59]));
        assert_eq!(all_after(&log, want[9]), want[10..]);
        let back = log.read_after(want[0], 1, usize::MAX, None).unwrap();
        assert_eq!(back.changes[0].new, changes[1].new);
        assert_eq!(back.changes[0].epoch, epoch);
    }

    #[test]
    fn lookups_by_position_use_the_sparse_index_before_and_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let floor = floor_for_slot(PgLsn(1));
        let opts = LogOptions {
            segment_bytes: 1 << 20,
            ..LogOptions::default()
        };
        let (log, _) = open_ready(dir.path(), opts.clone(), floor).unwrap();
        let r = rel();
        let changes: Vec<_> = (1..=12_000).map(|i| change(&r, i * 10, 0)).collect();
        for chunk in changes.chunks(1000) {
            log.append(chunk).unwrap();
        }
        {
            let st = log.state();
            assert!(!st.sealed.is_empty());
            assert!(st.sealed[0].index.as_ref().is_some_and(|i| i.len() > 8));
        }
        let check = |log: &LocalLog| {
            for k in [0usize, 1, 997, 5_432, 6_001, 11_998] {
                let p = log
                    .read_after(changes[k].position, 100, usize::MAX, None)
                    .unwrap();
                assert_eq!(p.changes[0].position, changes[k + 1].position, "after {k}");
            }
            assert!(
                log.read_after(changes[11_999].position, 100, usize::MAX, None)
                    .unwrap()
                    .end
            );
        };
        check(&log);
        drop(log);
        // Sealed segments of an earlier run get their index at the first lookup.
        let (log, _) = open_ready(dir.path(), opts, floor).unwrap();
        assert!(log.state().sealed[0].index.is_none());
        check(&log);
        assert!(log.state().sealed[0].index.is_some());
    }

    #[test]
    fn a_torn_tail_is_cut_at_recovery_and_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let floor = floor_for_slot(PgLsn(1));
        let (log, _) = open_ready(dir.path(), LogOptions::default(), floor).unwrap();
        let r = rel();
        let changes: Vec<_> = (1..=5).map(|i| change(&r, i * 10, 0)).collect();
        log.append(&changes).unwrap();
        log.sync().unwrap();
        drop(log);
        // The process died in the middle of writing the last record.
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            .unwrap()
            .path();
        let len = fs::metadata(&seg).unwrap().len();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len - 7).unwrap();
        drop(f);
        let (log, _) = open_ready(dir.path(), LogOptions::default(), floor).unwrap();
        assert_eq!(log.bounds().newest, Some(changes[3].position));
        assert_eq!(
            all_after(&log, floor),
            changes[..4].iter().map(|c| c.position).collect::<Vec<_>>()
        );
        // The same change logged again, as PostgreSQL re-sends it.
        log.append(&changes[4..]).unwrap();
        assert_eq!(
            all_after(&log, changes[3].position),
            vec![changes[4].position]
        );
        drop(log);

        // A flipped byte in the middle of the last record: cut there too.
        let len = fs::metadata(&seg).unwrap().len();
        let mut bytes = fs::read(&seg).unwrap();
        let at = (len - 10) as usize;
        bytes[at] ^= 0xFF;
        fs::write(&seg, &bytes).unwrap();
        let (log, _) = open_ready(dir.path(), LogOptions::default(), floor).unwrap();
        assert_eq!(log.bounds().newest, Some(changes[3].position));
    }

    #[test]
    fn retention_drops_oldest_segments_and_raises_the_floor() {
        let dir = tempfile::tempdir().unwrap();
        let floor = floor_for_slot(PgLsn(1));
        let opts = LogOptions {
            segment_bytes: 1024,
            retention_bytes: 4096,
            retention_age: Duration::from_secs(3600),
        };
        let (log, _) = open_ready(dir.path(), opts, floor).unwrap();
        let r = rel();
        let changes: Vec<_> = (1..=200).map(|i| change(&r, i * 10, 0)).collect();
        log.append(&changes).unwrap();
        log.enforce_retention(SystemTime::now()).unwrap();
        let b = log.bounds();
        assert!(b.bytes <= 4096 + 1024, "{b:?}");
        assert!(b.floor > floor);
        assert!(matches!(
            log.read_after(changes[0].position, 100, usize::MAX, None),
            Err(LogError::Gap { .. })
        ));
        let kept = all_after(&log, b.floor);
        assert_eq!(kept.last(), Some(&changes[199].position));
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        // Everything after the floor is there, and the floor is the last change
        // dropped, exactly.
        let first_kept = changes.iter().position(|c| c.position > b.floor).unwrap();
        assert_eq!(kept.len(), 200 - first_kept);
        assert_eq!(changes[first_kept - 1].position, b.floor);
        // Age: everything sealed is old a day later.
        log.enforce_retention(SystemTime::now() + Duration::from_secs(7200))
            .unwrap();
        assert_eq!(log.state().sealed.len(), 0);
        drop(log);
        let (log, _) = open_ready(dir.path(), LogOptions::default(), floor).unwrap();
        assert!(log.bounds().floor > b.floor);
    }

    #[test]
    fn a_reset_pending_survives_a_restart_and_leftovers_of_a_reset_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let floor = floor_for_slot(PgLsn(1));
        let (log, created) = LocalLog::open(dir.path(), small(), floor).unwrap();
        assert!(
            created && log.bounds().reset_pending,
            "a new log waits for its slot"
        );
        log.reset(floor).unwrap();
        let r = rel();
        log.append(&[change(&r, 10, 0), change(&r, 20, 0)]).unwrap();
        log.mark_reset_pending().unwrap();
        assert!(matches!(
            log.append(&[change(&r, 30, 0)]),
            Err(LogError::ResetPending)
        ));
        drop(log);
        // The process died before the slot was recreated and the log reset.
        let (log, _) = LocalLog::open(dir.path(), small(), floor).unwrap();
        assert!(log.bounds().reset_pending);
        // A reset whose meta was written but whose segments were not removed.
        let epoch = Epoch(log.bounds().epoch.0 ^ 0xFFFF);
        drop(log);
        write_meta(dir.path(), epoch, floor_for_slot(PgLsn(500)), false).unwrap();
        let (log, _) = LocalLog::open(dir.path(), small(), floor).unwrap();
        let b = log.bounds();
        assert_eq!((b.epoch, b.newest, b.reset_pending), (epoch, None, false));
        log.append(&[change(&r, 600, 0)]).unwrap();
        assert_eq!(all_after(&log, b.floor), vec![Position::new(PgLsn(600), 0)]);
    }

    #[test]
    fn reset_starts_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let floor = floor_for_slot(PgLsn(1));
        let (log, _) = open_ready(dir.path(), small(), floor).unwrap();
        let r = rel();
        log.append(&[change(&r, 10, 0), change(&r, 20, 0)]).unwrap();
        let old = log.bounds().epoch;
        let new_floor = floor_for_slot(PgLsn(500));
        let epoch = log.reset(new_floor).unwrap();
        assert_ne!(epoch, old);
        let b = log.bounds();
        assert_eq!((b.newest, b.floor), (None, new_floor));
        log.append(&[change(&r, 600, 0)]).unwrap();
        drop(log);
        let (log, _) = open_ready(dir.path(), small(), floor).unwrap();
        assert_eq!(log.bounds().epoch, epoch);
        assert_eq!(
            all_after(&log, new_floor),
            vec![Position::new(PgLsn(600), 0)]
        );
    }
}
