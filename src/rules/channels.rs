//! Private channels (`config.private` on `/realtime/v1`), authorized as
//! Supabase's Realtime Authorization does: by the RLS policies on
//! `realtime.messages`, asked as the member (its database role and JWT claims)
//! with `realtime.topic()` returning the channel's topic. Policies written for
//! Supabase work unchanged; with none, no one may use a private channel.
//!
//! Asked once per join, in one transaction that is rolled back: a probe row
//! per extension is inserted as Aether (so the SELECT policies have a row to
//! judge), then, as the member, whether it sees them (read) and whether it may
//! insert its own (send broadcasts, track presence).

use aether_core::principal::Principal;
use aether_realtime::{BoxFuture, ChannelPolicy, ChannelRights};

pub(crate) struct MessagePolicies(pub deadpool_postgres::Pool);

impl ChannelPolicy for MessagePolicies {
    fn rights<'a>(
        &'a self,
        principal: &'a Principal,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<ChannelRights, String>> {
        Box::pin(async move {
            // service_role bypasses RLS, as on Supabase.
            if principal.is_service() {
                return Ok(ChannelRights {
                    read: true,
                    broadcast: true,
                    presence: true,
                });
            }
            rights(&self.0, principal, topic)
                .await
                .map_err(|e| format!("{e:#}"))
        })
    }
}

pub(crate) const PROBE_EVENT: &str = "aether:authorization-probe";

async fn rights(
    pool: &deadpool_postgres::Pool,
    principal: &Principal,
    topic: &str,
) -> anyhow::Result<ChannelRights> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let probes = tx
        .query(
            "INSERT INTO realtime.messages (topic, extension, event, payload, private)
             SELECT $1, e, $2, '{}'::jsonb, true FROM unnest(ARRAY['broadcast', 'presence']) e
             RETURNING id",
            &[&topic, &PROBE_EVENT],
        )
        .await?;
    let ids: Vec<i64> = probes.iter().map(|r| r.get(0)).collect();
    tx.execute(
        "SELECT set_config('role', $1, true), set_config('statement_timeout', '5s', true),
                set_config('request.jwt.claims', $2, true),
                set_config('request.jwt.claim.sub', coalesce($3, ''), true),
                set_config('request.jwt.claim.role', $1, true),
                set_config('realtime.topic', $4, true)",
        &[
            &principal.role.database_role(),
            &principal.jwt_claims(),
            &principal.user_id,
            &topic,
        ],
    )
    .await?;
    let read = match tx
        .query_one(
            "SELECT count(*) FROM realtime.messages WHERE id = ANY($1)",
            &[&ids],
        )
        .await
    {
        Ok(r) => r.get::<_, i64>(0) > 0,
        // No SELECT grant: no right.
        Err(e) if is_denied(&e) => false,
        Err(e) => return Err(e.into()),
    };
    let may_insert = async |extension: &str| -> anyhow::Result<bool> {
        tx.batch_execute("SAVEPOINT probe").await?;
        let r = tx
            .execute(
                "INSERT INTO realtime.messages (topic, extension, event, payload, private)
                 VALUES ($1, $2, $3, '{}'::jsonb, true)",
                &[&topic, &extension, &PROBE_EVENT],
            )
            .await;
        tx.batch_execute("ROLLBACK TO SAVEPOINT probe").await?;
        match r {
            Ok(_) => Ok(true),
            Err(e) if is_denied(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    };
    let broadcast = may_insert("broadcast").await?;
    let presence = may_insert("presence").await?;
    tx.rollback().await?;
    Ok(ChannelRights {
        read,
        broadcast,
        presence,
    })
}

/// A refusal by RLS or the grants (`42501`), not a failure.
fn is_denied(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
}
