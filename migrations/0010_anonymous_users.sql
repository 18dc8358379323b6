-- Anonymous users (issue 15, supabase-js `signInAnonymously`): no email until
-- `updateUser` adds one. The seed routes sign users in by email, so they never
-- see such users.
ALTER TABLE auth.users ALTER COLUMN email DROP NOT NULL;
ALTER TABLE auth.users ADD COLUMN is_anonymous boolean NOT NULL DEFAULT false;
ALTER TABLE auth.users ADD CONSTRAINT users_email_unless_anonymous
    CHECK (email IS NOT NULL OR is_anonymous);
