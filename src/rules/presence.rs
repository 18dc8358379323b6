//! KingShare presence: who hears of a user coming online or going offline.

use aether_realtime::{BoxFuture, Directory};

/// Answers from `auth.users` and `public.shares`.
pub(crate) struct SharesDirectory(pub deadpool_postgres::Pool);

impl Directory for SharesDirectory {
    fn presence<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, (Option<String>, Vec<String>)> {
        Box::pin(async move {
            let Ok(client) = self.0.get().await else {
                return (None, Vec::new());
            };
            (
                username(&client, user_id).await,
                related_users(&client, user_id).await,
            )
        })
    }
}

/// A user's display name for presence: `user_metadata.username`, else the part of
/// the email before `@`.
async fn username(client: &tokio_postgres::Client, user_id: &str) -> Option<String> {
    client
        .query_opt(
            "SELECT coalesce(user_metadata->>'username', split_part(email, '@', 1), 'anonymous')
               FROM auth.users WHERE id = $1::text::uuid",
            &[&user_id],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

/// Who is told when `user_id` comes online or goes offline: the users it shares
/// files with, in either direction, through a live share. Never everyone.
async fn related_users(client: &tokio_postgres::Client, user_id: &str) -> Vec<String> {
    client
        .query(
            "SELECT DISTINCT other::text FROM (
                 SELECT shared_with AS other FROM public.shares
                  WHERE owner_id = $1::text::uuid AND shared_with IS NOT NULL
                    AND revoked_at IS NULL AND expired_at IS NULL
                 UNION
                 SELECT owner_id FROM public.shares
                  WHERE shared_with = $1::text::uuid AND revoked_at IS NULL AND expired_at IS NULL
             ) r WHERE other <> $1::text::uuid",
            &[&user_id],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default()
}
