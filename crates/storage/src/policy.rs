//! Who may read and write an object: the RLS policies on `public.files`
//! (Aether's defaults from migration 0017, and whatever a DBA adds),
//! evaluated by PostgreSQL as the caller's role with their claims, as
//! Supabase's storage does with `storage.objects`. The service role bypasses
//! them. Without the roles (a database user that may not create them) the
//! same defaults are applied in Rust ([`Actor`]'s rules).

use tokio_postgres::GenericClient;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::errors::StorageError;
use super::owners::Actor;
use super::{ObjectPath, StorageService, as_i64};

/// Whom the policies judge: a signed-in user or an anonymous reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Who {
    Anon,
    User(Uuid),
}

impl Who {
    fn user(self) -> Option<Uuid> {
        match self {
            Who::User(u) => Some(u),
            Who::Anon => None,
        }
    }

    /// `None` for the service role, which the policies do not judge.
    pub(super) fn of(actor: Actor) -> Option<Who> {
        match actor {
            Actor::User(u) => Some(Who::User(u)),
            Actor::Service => None,
        }
    }

    /// Its claims as its token has them (`aether.storage_claims` makes the
    /// same from the user's row where no token is at hand).
    pub(super) fn token_claims(self, email: Option<&str>) -> String {
        let mut c = serde_json::json!({ "role": self.role() });
        if let Who::User(u) = self {
            c["sub"] = serde_json::json!(u);
            c["aud"] = serde_json::json!("authenticated");
            if let Some(e) = email {
                c["email"] = serde_json::json!(e);
            }
        }
        c.to_string()
    }

    /// Its role and `sub` (empty for anon); `aether.storage_claims` makes
    /// the claims from them, as in the user's token.
    pub(super) fn settings(self) -> (&'static str, String) {
        let sub = self.user().map(|u| u.hyphenated().to_string());
        (self.role(), sub.unwrap_or_default())
    }

    fn role(self) -> &'static str {
        match self {
            Who::Anon => "anon",
            Who::User(_) => "authenticated",
        }
    }
}

/// Takes `who`'s role and claims for the rest of the transaction (until
/// [`leave`]): what `tx` reads and writes from now on, RLS decides.
pub(super) async fn enter(tx: &impl GenericClient, who: Who) -> Result<(), StorageError> {
    let (role, sub) = who.settings();
    // The claims are made before the role is taken (they read the user's
    // email, which the role may not).
    tx.execute(
        "SELECT set_config('request.jwt.claims', aether.storage_claims($1, $2), true),
                set_config('request.jwt.claim.sub', $2, true),
                set_config('request.jwt.claim.role', $1, true)",
        &[&role, &sub],
    )
    .await?;
    tx.execute("SELECT set_config('role', $1, true)", &[&role])
        .await?;
    Ok(())
}

/// Back to Aether's own role.
pub(super) async fn leave(tx: &impl GenericClient) -> Result<(), StorageError> {
    tx.execute("SELECT set_config('role', 'none', true)", &[])
        .await?;
    Ok(())
}

/// Runs one write of `public.files` as `who`; returns the rows it touched
/// (an UPDATE or DELETE the policies' `USING` hides touches none). A row
/// that a `WITH CHECK` refuses is [`StorageError::Forbidden`].
pub(super) async fn write_as(
    tx: &impl GenericClient,
    who: Who,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StorageError> {
    enter(tx, who).await?;
    let n = tx.execute(sql, params).await.map_err(refused)?;
    leave(tx).await?;
    Ok(n)
}

/// Whether `who` may read file `id`: one statement (see
/// `aether.storage_may_read`, which takes the role and claims for its own
/// query only), inside a transaction or not.
pub(super) async fn may_read(
    tx: &impl GenericClient,
    who: Who,
    id: Uuid,
) -> Result<bool, StorageError> {
    let (role, sub) = who.settings();
    Ok(tx
        .query_one(
            "SELECT aether.storage_may_read($1, $2, aether.storage_claims($2, $3), $3)",
            &[&id, &role, &sub],
        )
        .await
        .map_err(refused)?
        .get(0))
}

/// A policy's refusal as a storage error; other errors as they are.
pub(super) fn refused(e: tokio_postgres::Error) -> StorageError {
    match e.code() {
        Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => StorageError::Forbidden(format!(
            "{}: the bucket's policies do not allow it",
            e.as_db_error().map_or("refused", |d| d.message())
        )),
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
            StorageError::AlreadyExists("the object".into())
        }
        // The owner named is no user (deleted since their token was made).
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => {
            StorageError::Forbidden("the user this request acts for no longer exists".into())
        }
        _ => e.into(),
    }
}

/// How long whether the storage policies are in place is taken as known.
const POLICIES_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// A new row as the INSERT of a file writes it (for a dry run and the real
/// thing alike).
pub(super) const INSERT_FILE: &str = "INSERT INTO public.files
     (id, bucket_id, folder_id, path, name, size, mime_type, owner_id, storage_key, metadata)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

impl StorageService {
    /// Whether the storage policies are in place: RLS and policies on
    /// `public.files`, and the roles to run as. Asked again at most every
    /// [`POLICIES_TTL`], so a DBA who sets them up later needs no restart.
    pub(super) async fn policies(&self) -> Result<bool, StorageError> {
        let known = self.0.policies.lock().ok().and_then(|k| *k);
        if let Some((at, on)) = known
            && at.elapsed() < POLICIES_TTL
        {
            return Ok(on);
        }
        let client = self.0.pool.get().await?;
        let on: bool = client
            .query_one(
                // A missing role is NULL through to_regrole, never an error.
                "SELECT coalesce(c.relrowsecurity
                        AND pg_has_role(current_user, to_regrole('authenticated'), 'MEMBER')
                        AND pg_has_role(current_user, to_regrole('anon'), 'MEMBER')
                        AND EXISTS (SELECT 1 FROM pg_policies
                                    WHERE schemaname = 'public' AND tablename = 'files'),
                        false)
                 FROM pg_class c WHERE c.oid = 'public.files'::regclass",
                &[],
            )
            .await?
            .get(0);
        if !on && known.is_none_or(|(_, was)| was) {
            tracing::warn!(
                "storage policies are not in place (no anon/authenticated roles, or no policy on public.files): Aether's default storage rules apply"
            );
        }
        if let Ok(mut k) = self.0.policies.lock() {
            *k = Some((std::time::Instant::now(), on));
        }
        Ok(on)
    }

    /// Whom the policies judge for `actor`: a user when the policies are in
    /// place; `None` for the service role, and when they are not (then
    /// [`Actor`]'s rules apply).
    pub(super) async fn judged(&self, actor: Actor) -> Result<Option<Who>, StorageError> {
        match Who::of(actor) {
            Some(who) if self.policies().await? => Ok(Some(who)),
            _ => Ok(None),
        }
    }

    /// What [`StorageService::record`] would say of `who`'s write at
    /// `bucket/path` with `facts`, in a transaction that is rolled back: a
    /// new object's INSERT is judged before the name's uniqueness (so a name
    /// the caller may not write is 403 whether or not it is taken); an
    /// upsert of a taken name is judged as the UPDATE it is.
    pub(super) async fn dry_write(
        &self,
        who: Who,
        bucket: &str,
        path: &ObjectPath,
        upsert: bool,
        facts: &WriteFacts,
    ) -> Result<(), StorageError> {
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        let probe = Probe {
            bucket,
            path,
            owner: who.user(),
            facts,
        };
        // An upsert of a taken name is an UPDATE, judged by the UPDATE
        // policies only (as PostgreSQL judges `INSERT … ON CONFLICT DO
        // UPDATE`); anything else is an INSERT, judged before the name's
        // uniqueness is.
        let taken = if upsert {
            tx.query_one(
                "SELECT EXISTS (SELECT 1 FROM public.files WHERE bucket_id = $1 AND path = $2)",
                &[&bucket, &path.to_string()],
            )
            .await?
            .get(0)
        } else {
            probe_insert(&*tx, who, &probe).await? == Name::Taken
        };
        if taken {
            if !upsert {
                return Err(StorageError::AlreadyExists(path.to_string()));
            }
            let n = write_as(
                &*tx,
                who,
                "UPDATE public.files SET size = size WHERE bucket_id = $1 AND path = $2",
                &[&bucket, &path.to_string()],
            )
            .await?;
            if n == 0 {
                return Err(StorageError::Forbidden(format!(
                    "the object at {:?} is not yours to replace (by default only its owner or the service role may)",
                    path.to_string()
                )));
            }
        }
        if !taken && upsert {
            probe_insert(&*tx, who, &probe).await?;
        }
        tx.rollback().await?;
        Ok(())
    }
}

/// What is known of a write before it is made: the probe's row.
#[derive(Debug, Clone, Default)]
pub struct WriteFacts {
    pub mime: Option<String>,
    pub size: u64,
    pub user_metadata: Option<serde_json::Value>,
}

/// A row a write would insert.
pub(super) struct Probe<'a> {
    pub(super) bucket: &'a str,
    pub(super) path: &'a ObjectPath,
    pub(super) owner: Option<Uuid>,
    pub(super) facts: &'a WriteFacts,
}

/// Whether a probe found the name free or taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Name {
    Free,
    Taken,
}

/// Inserts `probe`'s row as `who` inside a savepoint and rolls it back: the
/// policies' `WITH CHECK` judge it (refused: [`StorageError::Forbidden`])
/// before the name's uniqueness does ([`Name::Taken`]). Nothing stays, and
/// an aborted subtransaction's row is never decoded from the WAL.
pub(super) async fn probe_insert(
    tx: &impl GenericClient,
    who: Who,
    probe: &Probe<'_>,
) -> Result<Name, StorageError> {
    let path = probe.path.to_string();
    let metadata = match &probe.facts.user_metadata {
        Some(m) => serde_json::json!({ "user_metadata": m }),
        None => serde_json::json!({}),
    };
    tx.batch_execute("SAVEPOINT aether_probe").await?;
    enter(tx, who).await?;
    let tried = tx
        .execute(
            INSERT_FILE,
            &[
                &Uuid::new_v4(),
                &probe.bucket,
                &None::<Uuid>,
                &path,
                &probe.path.name(),
                &as_i64(probe.facts.size),
                &probe.facts.mime,
                &probe.owner,
                &None::<String>,
                &metadata,
            ],
        )
        .await;
    // Undoes the row and the role taken after the savepoint; the savepoint
    // goes too, so what follows runs in the transaction itself.
    tx.batch_execute("ROLLBACK TO SAVEPOINT aether_probe; RELEASE SAVEPOINT aether_probe")
        .await?;
    match tried {
        Ok(_) => Ok(Name::Free),
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(Name::Taken),
        Err(e) => Err(refused(e)),
    }
}
