//! Who acts and whose objects: the [`Actor`] and what it may do, the
//! per-owner and per-name write locks, blob keys, and the bytes an owner uses.
//!
//! Objects are named by bucket and path, as on Supabase and S3; the owner is
//! recorded (`owner_id`), not part of the name. A path whose first segment is
//! a user id is that user's home: the seed routes keep a user's files there.

use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::ObjectPath;
use super::errors::StorageError;

/// Who acts on storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// A signed-in user: creates objects they then own.
    User(Uuid),
    /// The service role: acts on any object; what it creates has no owner and
    /// counts against no quota.
    Service,
}

impl Actor {
    /// The owner of what this actor creates.
    pub fn owner(self) -> Option<Uuid> {
        match self {
            Actor::User(u) => Some(u),
            Actor::Service => None,
        }
    }

    /// Whether it may replace, move or delete an object of `owner`.
    pub fn may_change(self, owner: Option<Uuid>) -> bool {
        match self {
            Actor::Service => true,
            Actor::User(u) => owner == Some(u),
        }
    }

    /// Whether it may read an object of `owner` in a bucket public or not.
    pub fn may_read(self, owner: Option<Uuid>, bucket_public: bool) -> bool {
        bucket_public || self.may_change(owner)
    }

    /// Refuses to create at `path` under another user's home folder: a
    /// signed-in user may create objects anywhere in a bucket except there,
    /// so that nobody can take a name in someone else's home.
    pub(super) fn check_create(self, path: &ObjectPath) -> Result<(), StorageError> {
        match (self, home_of(path)) {
            (Actor::User(u), Some(home)) if home != u => Err(StorageError::Forbidden(format!(
                "{:?} is under another user's folder: a user creates objects in their own folder or outside users' folders",
                path.to_string()
            ))),
            _ => Ok(()),
        }
    }
}

/// The user whose home `path` is, or is under (its first segment is a user
/// id): the home's own name is theirs too, or anyone could block it with a
/// file of that name.
fn home_of(path: &ObjectPath) -> Option<Uuid> {
    parse_uuid(path.prefixes().next()?.name())
}

/// Whether `dir` is a home folder itself (a single user-id segment), which
/// has no `folders` row: objects directly in it have `folder_id` NULL, as a
/// user's files at their root always had.
pub(super) fn is_home(dir: &ObjectPath) -> bool {
    let mut p = dir.prefixes();
    matches!((p.next(), p.next()), (Some(first), None) if parse_uuid(first.name()).is_some())
}

/// A user id as the seed routes write it: hyphenated lower case only, so
/// that one home has one spelling.
fn parse_uuid(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s)
        .ok()
        .filter(|u| u.hyphenated().to_string() == s)
}

async fn used_bytes(c: &impl GenericClient, owner: Uuid) -> Result<u64, StorageError> {
    let used: i64 = c
        .query_one(
            "SELECT COALESCE(SUM(size), 0)::bigint FROM public.files WHERE owner_id = $1",
            &[&owner],
        )
        .await?
        .get(0);
    Ok(u64::try_from(used).unwrap_or(0))
}

/// The account a write's bytes count against, and what the write frees there:
/// the caller's for a new object, the owner's an existing object keeps (a
/// DBA's policy may let one user replace another's), nobody's for an
/// owner-less object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub owner: Option<Uuid>,
    /// Bytes of the object the write replaces, already in `owner`'s account.
    pub replaced: u64,
}

impl Charge {
    /// A new object of `actor`'s.
    pub fn new_object(actor: Actor) -> Charge {
        Charge {
            owner: actor.owner(),
            replaced: 0,
        }
    }

    /// A write over an object of `owner`'s that holds `size` bytes.
    pub(super) fn replacing(owner: Option<Uuid>, size: u64) -> Charge {
        Charge {
            owner,
            replaced: size,
        }
    }
}

/// What a write is measured against: the charged owner's quota and the bytes
/// they already store, less what the write replaces.
#[derive(Debug, Clone, Copy)]
pub(super) struct Account {
    quota: u64,
    used: u64,
    /// Another user's account: the refusal does not tell their usage.
    foreign: bool,
}

impl Account {
    /// The account of `charge` for `actor`'s write, when a quota applies: the
    /// service role's writes, and objects without an owner, count against none.
    pub(super) async fn of(
        c: &impl GenericClient,
        actor: Actor,
        charge: Charge,
        quota: u64,
    ) -> Result<Option<Account>, StorageError> {
        let (Actor::User(me), Some(owner)) = (actor, charge.owner) else {
            return Ok(None);
        };
        let used = used_bytes(c, owner).await?.saturating_sub(charge.replaced);
        Ok(Some(Account {
            quota,
            used,
            foreign: owner != me,
        }))
    }

    /// Whether `needed` more bytes fit.
    pub(super) fn check(&self, needed: u64) -> Result<(), StorageError> {
        if self.used.saturating_add(needed) <= self.quota {
            return Ok(());
        }
        Err(if self.foreign {
            StorageError::OwnersQuotaExceeded {
                quota: self.quota,
                needed,
            }
        } else {
            StorageError::QuotaExceeded {
                quota: self.quota,
                used: self.used,
                needed,
            }
        })
    }
}

/// Locks the accounts of `owners` (see [`lock_owner`]) in one order, so two
/// writes that each need two accounts cannot wait for each other.
pub(super) async fn lock_owners(
    c: &impl GenericClient,
    mut owners: Vec<Option<Uuid>>,
) -> Result<(), StorageError> {
    owners.sort();
    owners.dedup();
    for o in owners {
        lock_owner(c, o).await?;
    }
    Ok(())
}

/// The first segment of the blob keys of owner-less (service-role) objects;
/// a user's keys start with their id.
const SERVICE_PREFIX: &str = "service";

/// A fresh blob key for `owner`'s bytes: `<owner>/<uuid>`, or
/// `service/<uuid>` for an owner-less object.
pub(super) fn blob_key(owner: Option<Uuid>) -> String {
    let id = Uuid::new_v4().simple();
    match owner {
        Some(o) => format!("{o}/{id}"),
        None => format!("{SERVICE_PREFIX}/{id}"),
    }
}

/// Serializes one owner's writes (all owner-less ones together) until the
/// transaction ends: the quota sum stays true under concurrent uploads.
pub(super) async fn lock_owner(
    c: &impl GenericClient,
    owner: Option<Uuid>,
) -> Result<(), StorageError> {
    let key = owner.map_or_else(|| SERVICE_PREFIX.to_owned(), |o| o.to_string());
    c.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 7489))",
        &[&key],
    )
    .await?;
    Ok(())
}

/// Serializes writes under the first segment of `path` in `bucket` until
/// the transaction ends: a file and a folder of one name (`a` and `a/b`)
/// are always under one first segment, so the checks that keep them apart
/// cannot race, whoever writes them. Taken in name order when a transaction
/// needs two (a move), so two moves cannot deadlock.
pub(super) async fn lock_names(
    c: &impl GenericClient,
    names: &[(&str, &ObjectPath)],
) -> Result<(), StorageError> {
    let mut keys: Vec<String> = names
        .iter()
        .map(|(bucket, path)| {
            let first = path.prefixes().next().map(|p| p.name().to_owned());
            format!("{bucket}/{}", first.unwrap_or_default())
        })
        .collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        c.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 7490))",
            &[&key],
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actors_change_their_own_and_the_service_role_anything() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(Actor::User(a).may_change(Some(a)));
        assert!(!Actor::User(a).may_change(Some(b)));
        assert!(!Actor::User(a).may_change(None));
        assert!(Actor::Service.may_change(Some(a)) && Actor::Service.may_change(None));
        assert!(Actor::User(a).may_read(None, true));
        assert!(!Actor::User(a).may_read(Some(b), false));
        assert!(blob_key(None).starts_with("service/"));
        assert!(blob_key(Some(a)).starts_with(&format!("{a}/")));
    }

    #[test]
    fn homes_are_first_segments_that_are_user_ids() {
        let a = Uuid::new_v4();
        let p = |s: &str| ObjectPath::parse(s).unwrap();
        assert_eq!(home_of(&p(&format!("{a}/x.png"))), Some(a));
        assert_eq!(home_of(&p(&a.to_string())), Some(a), "the home's own name");
        assert_eq!(home_of(&p("public/x.png")), None);
        assert_eq!(
            home_of(&p(&format!("{}/x", a.to_string().to_uppercase()))),
            None,
            "one spelling"
        );
        assert!(is_home(&p(&a.to_string())));
        assert!(!is_home(&p(&format!("{a}/docs"))));
        assert!(!is_home(&ObjectPath::root()));
        let b = Uuid::new_v4();
        assert!(Actor::User(a).check_create(&p(&format!("{a}/x"))).is_ok());
        assert!(Actor::User(b).check_create(&p(&format!("{a}/x"))).is_err());
        assert!(Actor::User(b).check_create(&p("shared/x")).is_ok());
        assert!(Actor::User(b).check_create(&p(&a.to_string())).is_err());
        assert!(Actor::Service.check_create(&p(&format!("{a}/x"))).is_ok());
    }
}
