// supabase.auth against Aether's /auth/v1: sign-up, sign-in, refresh, getUser,
// sign-out, and the error codes auth-js exposes.
import { assert, client, email, main, ok, password, url, anonKey } from './lib.mjs'

await main('auth', async () => {
  const supabase = client()
  const alice = email('alice')

  // Sign-up answers with a session (Aether confirms emails at once).
  const up = ok(await supabase.auth.signUp({ email: alice, password, options: { data: { name: 'Alice' } } }), 'signUp')
  assert.equal(up.user.email, alice)
  assert.equal(up.user.aud, 'authenticated')
  assert.equal(up.user.role, 'authenticated')
  assert.deepEqual(up.user.user_metadata, { name: 'Alice' })
  assert.deepEqual(up.user.app_metadata, { provider: 'email', providers: ['email'] })
  assert.ok(up.session.access_token && up.session.refresh_token)
  assert.equal(up.session.token_type, 'bearer')
  assert.ok(up.session.expires_in > 3000 && up.session.expires_at > Date.now() / 1000)

  // Errors carry GoTrue's codes.
  const dup = await supabase.auth.signUp({ email: alice, password })
  assert.equal(dup.error?.code, 'user_already_exists', JSON.stringify(dup.error))
  assert.equal(dup.error.status, 422)
  const weak = await supabase.auth.signUp({ email: email('weak'), password: 'short' })
  assert.equal(weak.error?.code, 'weak_password')
  assert.equal(weak.error.name, 'AuthWeakPasswordError')
  assert.ok(weak.error.reasons.includes('length'), JSON.stringify(weak.error))
  const bad = await supabase.auth.signInWithPassword({ email: alice, password: 'wrong password 1' })
  assert.equal(bad.error?.code, 'invalid_credentials')
  assert.equal(bad.error.status, 400)

  // Sign-in, getUser.
  await supabase.auth.signOut({ scope: 'local' })
  const signedIn = ok(await supabase.auth.signInWithPassword({ email: alice, password }), 'signInWithPassword')
  assert.equal(signedIn.user.id, up.user.id)
  const got = ok(await supabase.auth.getUser(), 'getUser')
  assert.equal(got.user.id, up.user.id)
  assert.equal(got.user.email, alice)

  // Refresh rotates the refresh token; the old one is refused afterwards.
  const before = signedIn.session
  const refreshed = ok(await supabase.auth.refreshSession(), 'refreshSession')
  assert.notEqual(refreshed.session.refresh_token, before.refresh_token)
  assert.equal(refreshed.user.id, up.user.id)
  assert.equal(ok(await supabase.auth.getUser(), 'getUser after refresh').user.id, up.user.id)
  const fresh = client()
  const again = await fresh.auth.refreshSession({ refresh_token: before.refresh_token })
  assert.equal(again.error?.code, 'refresh_token_already_used', JSON.stringify(again.error))
  // Reuse signs the session out (a stolen token is suspected): the rotated
  // access token is refused too, with the code auth-js maps to a missing session.
  const afterReuse = await supabase.auth.getUser(refreshed.session.access_token)
  assert.equal(afterReuse.error?.name, 'AuthSessionMissingError', JSON.stringify(afterReuse.error))
  const unknown = await fresh.auth.refreshSession({ refresh_token: 'no-such-token' })
  assert.equal(unknown.error?.code, 'refresh_token_not_found')

  // Sign-out (global by default) ends every session of the user; its tokens stop working.
  const s1 = ok(await supabase.auth.signInWithPassword({ email: alice, password }), 'signIn 2').session
  const other = client()
  const s2 = ok(await other.auth.signInWithPassword({ email: alice, password }), 'signIn 3').session
  ok(await supabase.auth.signOut(), 'signOut')
  assert.equal((await supabase.auth.getSession()).data.session, null)
  for (const s of [s1, s2]) {
    const r = await fresh.auth.getUser(s.access_token)
    assert.equal(r.error?.name, 'AuthSessionMissingError')
  }
  const r = await fresh.auth.refreshSession({ refresh_token: s2.refresh_token })
  assert.equal(r.error?.code, 'refresh_token_not_found')

  // A request without an apikey is refused, as by Supabase's gateway.
  const res = await fetch(`${url}/auth/v1/signup`, { method: 'POST', body: '{}', headers: { 'content-type': 'application/json' } })
  assert.equal(res.status, 401)
  const withKey = await fetch(`${url}/auth/v1/settings`, { headers: { apikey: anonKey } })
  assert.equal(withKey.status, 200)
})
