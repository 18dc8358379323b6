//! Listing: a folder's contents, and pages of files under a prefix.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::buckets::bucket_in;
use super::errors::StorageError;
use super::files::{FILE_COLUMNS, FileRecord, FolderRecord, file_from_row, folder_from_row};
use super::owners::{Actor, is_home};
use super::policy::{self, Who};
use super::{ObjectPath, StorageService};

/// What is directly inside a folder (or a bucket's root).
#[derive(Debug, Clone)]
pub struct Listing {
    /// `None` for the root and for a home folder (neither has a row).
    pub folder_id: Option<Uuid>,
    pub folders: Vec<FolderRecord>,
    /// At the root: the home folders (named after a user id, without a
    /// row) that hold something listed.
    pub homes: Vec<String>,
    pub files: Vec<FileRecord>,
}

/// Whose objects a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListScope {
    /// One user's own (the seed routes' view).
    Own(Uuid),
    /// What the actor may read: as the storage policies say (without them, a
    /// user's own objects; the service role everyone's).
    Readable(Actor),
}

impl StorageService {
    /// The owner a listing keeps to, and whom the policies judge it as.
    async fn scope(&self, scope: ListScope) -> Result<(Option<Uuid>, Option<Who>), StorageError> {
        Ok(match scope {
            ListScope::Own(u) => (Some(u), None),
            ListScope::Readable(actor) => match self.judged(actor).await? {
                Some(who) => (None, Some(who)),
                None => (actor.owner(), None),
            },
        })
    }
}

/// The order of [`StorageService::files_under`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SortColumn {
    #[default]
    Name,
    CreatedAt,
    UpdatedAt,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileSort {
    pub column: SortColumn,
    pub desc: bool,
}

/// Where a page of [`StorageService::files_under`] ended: the last file's
/// sort time (when sorting by time), path and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCursor {
    pub time: Option<DateTime<Utc>>,
    pub path: String,
    pub id: Uuid,
}

impl StorageService {
    /// The files and folders directly under `folder` (the root when empty)
    /// that `scope` shows. A home folder always exists (it has no row); any
    /// other folder must.
    pub async fn list(
        &self,
        bucket: &str,
        folder: &ObjectPath,
        scope: ListScope,
    ) -> Result<Listing, StorageError> {
        let (only, who) = self.scope(scope).await?;
        let mut client = self.0.pool.get().await?;
        let client = client.transaction().await?;
        bucket_in(&*client, bucket).await?;
        if let Some(who) = who {
            policy::enter(&*client, who).await?;
        }
        let dir = folder.to_string();
        let folder_id: Option<Uuid> = if folder.is_root() || is_home(folder) {
            None
        } else {
            let row = client
                .query_opt(
                    "SELECT id FROM public.folders WHERE bucket_id = $1 AND path = $2",
                    &[&bucket, &dir],
                )
                .await
                .map_err(policy::refused)?
                .ok_or_else(|| StorageError::NotFound(format!("folder {dir:?} not found")))?;
            Some(row.get(0))
        };
        let inside = format!("{dir}/");
        let inside_end = format!("{dir}0");
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&bucket, &only];
        // `= $3` under a folder (served by the parent/folder indexes); a home's
        // and the root's contents have no parent row.
        let (parent_cond, folder_cond) = match &folder_id {
            Some(id) => {
                params.push(id);
                ("parent_id = $3", "folder_id = $3")
            }
            None if folder.is_root() => (
                "parent_id IS NULL AND strpos(path, '/') = 0",
                "folder_id IS NULL AND strpos(path, '/') = 0",
            ),
            // `dir/` .. `dir0` is the range of paths under it ('0' follows '/').
            None => {
                params.push(&inside);
                params.push(&inside_end);
                (
                    "parent_id IS NULL AND path COLLATE \"C\" >= $3 AND path COLLATE \"C\" < $4
                     AND starts_with(path, $3)",
                    "folder_id IS NULL AND path COLLATE \"C\" >= $3 AND path COLLATE \"C\" < $4
                     AND starts_with(path, $3)",
                )
            }
        };
        let owned = "($2::uuid IS NULL OR owner_id = $2)";
        // A folder is listed for its owner, and for whoever has files in it.
        let folders = client
            .query(
                &format!(
                    "SELECT id, parent_id, path, name, created_at FROM public.folders f
                     WHERE bucket_id = $1 AND {parent_cond}
                       AND ($2::uuid IS NULL OR owner_id = $2
                            OR EXISTS (SELECT 1 FROM public.files x
                                       WHERE x.owner_id = $2 AND x.bucket_id = f.bucket_id
                                         AND x.path COLLATE \"C\" >= f.path || '/'
                                         AND x.path COLLATE \"C\" < f.path || '0'
                                         AND starts_with(x.path, f.path || '/')))
                     ORDER BY name"
                ),
                &params,
            )
            .await
            .map_err(policy::refused)?
            .iter()
            .map(folder_from_row)
            .collect();
        let files = client
            .query(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM public.files
                     WHERE bucket_id = $1 AND {owned} AND {folder_cond}
                     ORDER BY name"
                ),
                &params,
            )
            .await
            .map_err(policy::refused)?
            .iter()
            .map(file_from_row)
            .collect();
        let homes = if folder.is_root() {
            client
                .query(
                    &format!(
                        "SELECT split_part(path, '/', 1) FROM public.files
                         WHERE bucket_id = $1 AND {owned} AND folder_id IS NULL AND strpos(path, '/') > 0
                         UNION
                         SELECT split_part(path, '/', 1) FROM public.folders
                         WHERE bucket_id = $1 AND {owned} AND parent_id IS NULL AND strpos(path, '/') > 0
                         ORDER BY 1"
                    ),
                    &params,
                )
                .await
                .map_err(policy::refused)?
                .iter()
                .map(|r| r.get(0))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Listing {
            folder_id,
            folders,
            homes,
            files,
        })
    }

    /// Files `scope` shows in `bucket` whose path starts
    /// with `prefix` (a plain string prefix, not only a folder), in `sort`
    /// order, after `after` when given; at most `limit`. Paths compare
    /// bytewise (`COLLATE "C"`), as Rust strings do.
    pub async fn files_under(
        &self,
        bucket: &str,
        scope: ListScope,
        prefix: &str,
        sort: FileSort,
        after: Option<&FileCursor>,
        limit: usize,
    ) -> Result<Vec<FileRecord>, StorageError> {
        let (only, who) = self.scope(scope).await?;
        let mut client = self.0.pool.get().await?;
        let client = client.transaction().await?;
        bucket_in(&*client, bucket).await?;
        if let Some(who) = who {
            policy::enter(&*client, who).await?;
        }
        let owners: Option<Vec<Uuid>> = only.map(|u| vec![u]);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (dir, op) = if sort.desc {
            ("DESC", "<")
        } else {
            ("ASC", ">")
        };
        let time = match sort.column {
            SortColumn::Name => None,
            SortColumn::CreatedAt => Some("created_at"),
            SortColumn::UpdatedAt => Some("updated_at"),
        };
        let upper = prefix_upper_bound(prefix);
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&bucket, &owners, &prefix, &limit];
        let mut keyset = String::new();
        let after_time = after.and_then(|c| c.time);
        if let Some(c) = after {
            params.push(&c.path);
            params.push(&c.id);
            keyset = match time {
                None => format!("AND (path COLLATE \"C\", id) {op} ($5 COLLATE \"C\", $6)"),
                Some(col) => {
                    params.push(&after_time);
                    format!("AND ({col}, path COLLATE \"C\", id) {op} ($7, $5 COLLATE \"C\", $6)")
                }
            };
        }
        let range = match &upper {
            Some(u) => {
                params.push(u);
                format!(
                    "AND path COLLATE \"C\" >= $3 AND path COLLATE \"C\" < ${}",
                    params.len()
                )
            }
            None => "AND path COLLATE \"C\" >= $3".to_owned(),
        };
        let order = match time {
            None => format!("path COLLATE \"C\" {dir}, id {dir}"),
            Some(col) => format!("{col} {dir}, path COLLATE \"C\" {dir}, id {dir}"),
        };
        let rows = client
            .query(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM public.files
                     WHERE bucket_id = $1 AND ($2::uuid[] IS NULL OR owner_id = ANY($2))
                       AND starts_with(path, $3) {range} {keyset}
                     ORDER BY {order} LIMIT $4"
                ),
                &params,
            )
            .await
            .map_err(policy::refused)?;
        Ok(rows.iter().map(file_from_row).collect())
    }
}

/// The least string above every string that starts with `prefix`, in byte
/// order (`COLLATE "C"`), or `None` when nothing is (an empty prefix, or one
/// of U+10FFFF only). UTF-8 orders bytes as it orders code points, so that
/// is `prefix` with its last character replaced by the next one (U+10FFFF
/// has none: drop it and step the one before). With it, `starts_with(path,
/// p)` is also an index range, `path >= p AND path < upper`, on
/// `(bucket_id, path COLLATE "C")`: a prefix no longer scans the bucket.
pub(crate) fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut s = prefix.to_owned();
    while let Some(last) = s.pop() {
        let next = (u32::from(last) + 1..=0x10FFFF).find_map(char::from_u32);
        if let Some(c) = next {
            s.push(c);
            return Some(s);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::prefix_upper_bound;

    #[test]
    fn the_upper_bound_is_the_next_string_past_the_prefix() {
        assert_eq!(prefix_upper_bound(""), None);
        assert_eq!(prefix_upper_bound("a/"), Some("a0".into()));
        assert_eq!(prefix_upper_bound("é"), Some("ê".into()));
        // The surrogates are no characters: U+D7FF is followed by U+E000.
        assert_eq!(prefix_upper_bound("x\u{D7FF}"), Some("x\u{E000}".into()));
        assert_eq!(prefix_upper_bound("x\u{FFFF}"), Some("x\u{10000}".into()));
        // U+10FFFF has no successor: the character before it steps.
        assert_eq!(prefix_upper_bound("x\u{10FFFF}"), Some("y".into()));
        assert_eq!(prefix_upper_bound("\u{10FFFF}\u{10FFFF}"), None);
        // Whatever starts with the prefix sorts below the bound, bytewise.
        for p in ["a/", "é", "x\u{D7FF}", "x\u{10FFFF}", "\u{7F}"] {
            let upper = prefix_upper_bound(p).unwrap();
            for tail in ["", "\u{0}", "z", "\u{10FFFF}\u{10FFFF}"] {
                let s = format!("{p}{tail}");
                assert!(s.as_bytes() < upper.as_bytes(), "{s:?} < {upper:?}");
            }
            assert!(p.as_bytes() < upper.as_bytes() && !upper.starts_with(p));
        }
    }
}
