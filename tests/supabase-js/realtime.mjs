// supabase.channel().on('postgres_changes') against Aether's /realtime/v1,
// under both Phoenix framings (vsn 1.0.0 and 2.0.0): changes made through the
// client (storage uploads and removes write public.files rows) and through
// plain SQL, with and without filters, INSERT/UPDATE/DELETE, heartbeats, and a
// second user who must not see the first user's private rows.
import crypto from 'node:crypto'
import { assert, client, email, main, ok, password, sql, subscribed } from './lib.mjs'

function waitFor(list, n, what, ms = 10000) {
  return new Promise((resolve, reject) => {
    const started = Date.now()
    const tick = () => {
      if (list.length >= n) return resolve(list)
      if (Date.now() - started > ms) return reject(new Error(`timed out waiting for ${n} ${what}, got ${JSON.stringify(list)}`))
      setTimeout(tick, 20)
    }
    tick()
  })
}


const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

// An HS256 JWT, as an operator would mint one with JWT_SECRET.
function jwt(claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url')
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`
  const sig = crypto.createHmac('sha256', process.env.JWT_SECRET).update(body).digest('base64url')
  return `${body}.${sig}`
}

await main('realtime', async () => {
  // As a Supabase app has it: granted to signed-in users, each row readable
  // by its owner through an RLS policy, which Aether applies to changes.
  await sql(`CREATE TABLE public.todos (id bigserial PRIMARY KEY, owner_id uuid, title text, done boolean DEFAULT false);
             ALTER TABLE public.todos REPLICA IDENTITY FULL;
             GRANT SELECT ON public.todos TO authenticated;
             ALTER TABLE public.todos ENABLE ROW LEVEL SECURITY;
             CREATE POLICY "own todos" ON public.todos FOR SELECT TO authenticated USING ((select auth.uid()) = owner_id);
             ALTER PUBLICATION aether_realtime ADD TABLE public.todos;`)
  const aliceEmail = email('alice')
  const bobEmail = email('bob')
  const a0 = client()
  const aliceId = ok(await a0.auth.signUp({ email: aliceEmail, password }), 'alice signUp').user.id
  const b0 = client()
  const bobId = ok(await b0.auth.signUp({ email: bobEmail, password }), 'bob signUp').user.id

  for (const vsn of ['1.0.0', '2.0.0']) {
    // Titles of their own per round: rows of the first round change no more.
    const plain = `plain ${vsn}`
    const spec = `special ${vsn}`
    const heartbeats = []
    const alice = client(undefined, { realtime: { vsn, heartbeatIntervalMs: 300, heartbeatCallback: (s) => heartbeats.push(s) } })
    ok(await alice.auth.signInWithPassword({ email: aliceEmail, password }), 'alice signIn')
    const bob = client(undefined, { realtime: { vsn } })
    ok(await bob.auth.signInWithPassword({ email: bobEmail, password }), 'bob signIn')
    const bucket = `rt-${vsn.replace(/\./g, '')}-${Math.random().toString(36).slice(2, 6)}`
    ok(await alice.storage.createBucket(bucket), 'createBucket')

    const all = []
    const special = []
    const files = []
    const system = []
    const ch = alice
      .channel(`todos-${vsn}`)
      .on('postgres_changes', { event: '*', schema: 'public', table: 'todos' }, (p) => all.push(p))
      .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'todos', filter: `title=eq.${spec}` }, (p) => special.push(p))
      .on('postgres_changes', { event: '*', schema: 'public', table: 'files', filter: `bucket_id=eq.${bucket}` }, (p) => files.push(p))
      .on('system', {}, (p) => system.push(p))
    await subscribed(ch)
    const bobSeen = []
    const bch = bob.channel(`bob-${vsn}`).on('postgres_changes', { event: '*', schema: 'public', table: 'todos' }, (p) => bobSeen.push(p))
    await subscribed(bch)
    await waitFor(system, 1, 'system message')
    assert.equal(system[0].message, 'Subscribed to PostgreSQL')
    assert.equal(system[0].status, 'ok')

    // Plain SQL.
    await sql(`INSERT INTO public.todos (owner_id, title) VALUES ('${aliceId}', '${plain}');
               INSERT INTO public.todos (owner_id, title) VALUES ('${aliceId}', '${spec}');
               UPDATE public.todos SET done = true WHERE title = '${plain}';
               DELETE FROM public.todos WHERE title = '${spec}';
               INSERT INTO public.todos (owner_id, title) VALUES ('${bobId}', 'bob private ${vsn}');`)
    await waitFor(all, 4, 'todo changes')
    assert.deepEqual(all.map((p) => [p.eventType, p.new.title ?? p.old.title]), [
      ['INSERT', plain], ['INSERT', spec], ['UPDATE', plain], ['DELETE', spec],
    ])
    const [ins, , upd, del] = all
    assert.equal(ins.schema, 'public')
    assert.equal(ins.table, 'todos')
    assert.equal(ins.new.owner_id, aliceId)
    assert.equal(typeof ins.new.id, 'number')
    assert.equal(ins.new.done, false)
    assert.ok(!Number.isNaN(Date.parse(ins.commit_timestamp)))
    assert.equal(upd.old.done, false)
    assert.equal(upd.new.done, true)
    assert.equal(del.old.title, spec)
    assert.deepEqual(del.new, {})
    await waitFor(special, 1, 'filtered INSERT')
    assert.equal(special[0].new.title, spec)
    await waitFor(bobSeen, 1, 'bob\'s own row')
    await sleep(300)
    assert.equal(special.length, 1)
    assert.equal(all.length, 4, 'alice does not see bob\'s row')
    assert.deepEqual(bobSeen.map((p) => p.new.title), [`bob private ${vsn}`], 'bob sees only his own row')

    // Through the client: storage writes public.files rows.
    const store = alice.storage.from(bucket)
    ok(await store.upload('a.txt', Buffer.from('one'), { contentType: 'text/plain' }), 'upload')
    ok(await store.upload('a.txt', Buffer.from('two!'), { contentType: 'text/plain', upsert: true }), 'upsert')
    ok(await store.remove(['a.txt']), 'remove')
    await waitFor(files, 3, 'file changes')
    assert.deepEqual(files.map((p) => p.eventType), ['INSERT', 'UPDATE', 'DELETE'])
    assert.equal(files[0].new.path, 'a.txt')
    assert.equal(files[1].new.size, 4)
    assert.equal(files[2].old.path, 'a.txt')
    assert.equal(files[0].new.storage_key !== undefined, true)

    assert.ok(heartbeats.includes('ok'), `heartbeats answered (${heartbeats})`)
    assert.equal(await alice.removeChannel(ch), 'ok')
    await bob.removeChannel(bch)
    alice.realtime.disconnect()
    bob.realtime.disconnect()
  }

  // A token that expires closes the channel with a system message.
  const rt = client(undefined, { realtime: { vsn: '2.0.0' } })
  const now = Math.floor(Date.now() / 1000)
  await rt.realtime.setAuth(jwt({ sub: aliceId, role: 'authenticated', aud: 'authenticated', iat: now, exp: now + 2 }))
  const sys = []
  const statuses = []
  const ech = rt.channel('expiring')
    .on('postgres_changes', { event: '*', schema: 'public', table: 'todos' }, () => {})
    .on('system', {}, (p) => sys.push(p))
  await new Promise((resolve, reject) => {
    ech.subscribe((s) => { statuses.push(s); if (s === 'SUBSCRIBED') resolve(); else if (s !== 'CLOSED') reject(new Error(s)) })
  })
  await waitFor(sys, 2, 'expiry system message', 8000)
  assert.equal(sys[1].status, 'error')
  assert.match(sys[1].message, /expired/i)
  await waitFor(statuses, 2, 'channel close', 3000)
  assert.equal(statuses[1], 'CLOSED')
  rt.realtime.disconnect()
})
