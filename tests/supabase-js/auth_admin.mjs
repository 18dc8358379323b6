// auth.updateUser and the admin users API (auth.admin.*) against Aether's
// /auth/v1, with GoTrue's errors; a deleted user's files and sessions go too.
import { assert, client, email, main, ok, password, serviceKey, url, anonKey } from './lib.mjs'

await main('auth-admin', async () => {
  const supabase = client()
  const who = email('upd')
  const up = ok(await supabase.auth.signUp({ email: who, password }), 'signUp')

  // updateUser: metadata merges, password and email change.
  const u1 = ok(await supabase.auth.updateUser({ data: { name: 'Upd', theme: 'dark' } }), 'updateUser data')
  assert.deepEqual(u1.user.user_metadata, { name: 'Upd', theme: 'dark' })
  const u2 = ok(await supabase.auth.updateUser({ data: { theme: 'light' } }), 'updateUser merge')
  assert.deepEqual(u2.user.user_metadata, { name: 'Upd', theme: 'light' })
  ok(await supabase.auth.updateUser({ password: 'a much longer passphrase' }), 'updateUser password')
  const weak = await supabase.auth.updateUser({ password: 'short' })
  assert.equal(weak.error?.code, 'weak_password', JSON.stringify(weak.error))
  const moved = email('moved')
  assert.equal(ok(await supabase.auth.updateUser({ email: moved }), 'updateUser email').user.email, moved)
  await supabase.auth.signOut({ scope: 'local' })
  const old = await client().auth.signInWithPassword({ email: moved, password })
  assert.equal(old.error?.code, 'invalid_credentials')
  ok(await client().auth.signInWithPassword({ email: moved, password: 'a much longer passphrase' }), 'signIn new password')
  // Letters only are enough by default (PASSWORD_MIN_LENGTH 8, no classes).
  ok(await client().auth.signUp({ email: email('plain'), password: 'abcdefgh' }), 'signUp letters only')

  // The admin API, with the service-role key.
  const admin = client(serviceKey).auth.admin
  const created = ok(await admin.createUser({ email: email('made'), password, user_metadata: { by: 'admin' }, email_confirm: true }), 'createUser').user
  assert.deepEqual(created.user_metadata, { by: 'admin' })
  const dup = await admin.createUser({ email: created.email, password })
  assert.equal(dup.error?.code, 'email_exists', JSON.stringify(dup.error))
  assert.equal(ok(await admin.getUserById(created.id), 'getUserById').user.email, created.email)
  const listed = ok(await admin.listUsers({ page: 1, perPage: 1000 }), 'listUsers')
  assert.ok(listed.users.some((u) => u.id === created.id) && listed.users.some((u) => u.id === up.user.id))
  assert.ok(listed.total >= 3, JSON.stringify(listed.total))
  const changed = ok(await admin.updateUserById(created.id, { user_metadata: { role: 'editor' }, app_metadata: { plan: 'pro' } }), 'updateUserById').user
  assert.deepEqual(changed.user_metadata, { by: 'admin', role: 'editor' })
  assert.equal(changed.app_metadata.plan, 'pro')
  const signedIn = client()
  ok(await signedIn.auth.signInWithPassword({ email: created.email, password }), 'created user signs in')
  ok(await signedIn.storage.from('files').upload('note.txt', Buffer.from('hi'), { contentType: 'text/plain' }), 'upload before delete')
  const before = ok(await client(serviceKey).from('files').select('id').eq('owner_id', created.id), 'files before delete')
  assert.equal(before.length, 1)
  ok(await admin.deleteUser(created.id), 'deleteUser')
  const gone = await admin.getUserById(created.id)
  assert.equal(gone.error?.code, 'user_not_found', JSON.stringify(gone.error))
  const afterDelete = await signedIn.auth.getUser()
  assert.ok(afterDelete.error, 'the deleted user\'s token is refused')
  // Their files went with them (read through /rest/v1 as the service role).
  const files = ok(await client(serviceKey).from('files').select('id').eq('owner_id', created.id), 'files after delete')
  assert.deepEqual(files, [])

  // Not an admin: a user's token or the anon key.
  const notAdmin = await supabase.auth.admin.listUsers()
  assert.equal(notAdmin.error?.status, 403, JSON.stringify(notAdmin.error))

  // Anonymous sign-in: a session, no email; updateUser gives one, and the user
  // is no longer anonymous. Seed sign-in (by email) never finds such a user.
  const guest = client()
  const anonUp = ok(await guest.auth.signInAnonymously({ options: { data: { nick: 'g' } } }), 'signInAnonymously')
  assert.equal(anonUp.user.is_anonymous, true)
  assert.equal(anonUp.user.email, '')
  assert.deepEqual(anonUp.user.user_metadata, { nick: 'g' })
  assert.ok(anonUp.session.access_token)
  assert.equal(ok(await guest.auth.getUser(), 'getUser anonymous').user.is_anonymous, true)
  const claimed = email('claimed')
  const converted = ok(await guest.auth.updateUser({ email: claimed, password: 'guest passphrase' }), 'updateUser anonymous').user
  assert.equal(converted.email, claimed)
  assert.equal(converted.is_anonymous, false)
  ok(await client().auth.signInWithPassword({ email: claimed, password: 'guest passphrase' }), 'converted user signs in')

  // A valid bearer token is enough without an apikey, as on Supabase.
  const session = ok(await client().auth.signInWithPassword({ email: moved, password: 'a much longer passphrase' }), 'signIn for bearer').session
  const bearer = { Authorization: `Bearer ${session.access_token}` }
  assert.equal((await fetch(`${url}/auth/v1/user`, { headers: bearer })).status, 200)
  assert.equal((await fetch(`${url}/storage/v1/bucket`, { headers: bearer })).status, 200)
  assert.equal((await fetch(`${url}/rest/v1/nope`, { headers: bearer })).status, 404)
  assert.equal((await fetch(`${url}/auth/v1/user`, { headers: { Authorization: 'Bearer nonsense' } })).status, 401)

  // Unknown paths answer in GoTrue's format.
  const res = await fetch(`${url}/auth/v1/nope`, { headers: { apikey: anonKey } })
  assert.equal(res.status, 404)
  const body = await res.json()
  assert.equal(body.code, 'not_found')
  assert.equal(typeof body.message, 'string')
})
