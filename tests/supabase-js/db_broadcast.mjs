// Broadcast from the database with the real client: `realtime.send` and a
// trigger calling it reach a channel's members through the WAL; private
// messages (Supabase's default) reach only the private channel's members, not
// this public channel's; delivered rows are pruned from `realtime.messages`.
import { assert, client, email, main, ok, password, sql, subscribed, waitUntil } from './lib.mjs'

// Retries `statement` (which raises until its condition holds) for up to 15 s.
async function eventually(statement, what) {
  const started = Date.now()
  for (;;) {
    try {
      return await sql(statement)
    } catch (e) {
      if (Date.now() - started > 15000) throw new Error(`${what}: ${e.message}`)
      await new Promise((r) => setTimeout(r, 200))
    }
  }
}

await main('db_broadcast', async () => {
  // Commit times come from PostgreSQL's clock, on this machine.
  const started = Date.now() - 1000
  const topic = `db-room-${Math.random().toString(36).slice(2, 8)}`
  const heard = []
  const other = []
  const sb = client()
  const ch = sb.channel(topic).on('broadcast', { event: '*' }, (m) => heard.push(m))
  await subscribed(ch)
  // A member of another topic hears nothing of this one.
  const ch2 = client().channel(`${topic}-other`).on('broadcast', { event: '*' }, (m) => other.push(m))
  await subscribed(ch2)

  await sql(`SELECT realtime.send('{"n": 1}'::jsonb, 'note', '${topic}', false)`)
  await waitUntil(() => heard.length >= 1, 'the first database broadcast')
  assert.equal(heard[0].type, 'broadcast')
  assert.equal(heard[0].event, 'note')
  assert.deepEqual(heard[0].payload, { n: 1 })

  // Private by default, as on Supabase: no one hears it yet.
  await sql(`SELECT realtime.send('{"n": 2}'::jsonb, 'note', '${topic}')`)
  // A trigger broadcasting each new row, fired by a plain INSERT.
  await sql(`
    CREATE TABLE public.chat (id serial PRIMARY KEY, body text NOT NULL);
    CREATE FUNCTION public.chat_broadcast() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM realtime.send(jsonb_build_object('id', NEW.id, 'body', NEW.body), 'chat', '${topic}', false);
      RETURN NEW;
    END $$;
    CREATE TRIGGER chat_broadcast AFTER INSERT ON public.chat
      FOR EACH ROW EXECUTE FUNCTION public.chat_broadcast();
    INSERT INTO public.chat (body) VALUES ('hello'), ('again');`)
  await waitUntil(() => heard.length >= 3, 'the trigger broadcasts')
  assert.deepEqual(
    heard.map((m) => [m.event, m.payload]),
    [['note', { n: 1 }], ['chat', { id: 1, body: 'hello' }], ['chat', { id: 2, body: 'again' }]],
  )
  // broadcast_changes is private, as on Supabase: the public channel does not hear it.
  await sql(`SELECT realtime.broadcast_changes('${topic}', 'INSERT', 'INSERT', 'chat', 'public', NULL::record, NULL::record)`)
  await sql(`SELECT realtime.send('{"n": 3}'::jsonb, 'note', '${topic}', false)`)
  await waitUntil(() => heard.length >= 4, 'the last database broadcast')
  assert.deepEqual(heard[3].payload, { n: 3 })
  assert.equal(heard.length, 4, JSON.stringify(heard))
  assert.equal(other.length, 0, JSON.stringify(other))

  // Relayed rows leave the table.
  await eventually(
    `DO $$ BEGIN
       IF (SELECT count(*) FROM realtime.messages WHERE topic = '${topic}' AND NOT private) > 0 THEN
         RAISE EXCEPTION 'not pruned yet';
       END IF;
     END $$`,
    'relayed messages are pruned',
  )

  // Replay: a member of the private channel joining now asks for the private
  // messages it missed. Their rows are pruned already; they come from the
  // change log, marked as replayed, oldest first.
  await sql(`CREATE POLICY "replay readers" ON realtime.messages FOR SELECT TO authenticated
               USING (realtime.topic() = '${topic}')`)
  const reader = client()
  ok(await reader.auth.signUp({ email: email('replay'), password }), 'reader signUp')
  const replayed = []
  const ch3 = reader
    .channel(topic, { config: { private: true, broadcast: { replay: { since: started, limit: 10 } } } })
    .on('broadcast', { event: '*' }, (m) => replayed.push(m))
  await subscribed(ch3)
  await waitUntil(() => replayed.length >= 2, 'the replayed private broadcasts', () => JSON.stringify(replayed))
  assert.deepEqual(
    replayed.map((m) => [m.event, m.meta?.replayed === true, typeof m.meta?.id]),
    [['note', true, 'string'], ['INSERT', true, 'string']],
  )
  assert.deepEqual(replayed[0].payload, { n: 2 })
  assert.equal(replayed[1].payload.operation, 'INSERT')
  // `limit` counts from the oldest.
  await reader.removeChannel(ch3)
  const one = []
  const ch4 = reader
    .channel(topic, { config: { private: true, broadcast: { replay: { since: started, limit: 1 } } } })
    .on('broadcast', { event: '*' }, (m) => one.push(m))
  await subscribed(ch4)
  await waitUntil(() => one.length >= 1, 'one replayed broadcast')
  // A live private message after it: not replayed, and nothing replayed in between.
  await sql(`SELECT realtime.send('{"n": 4}'::jsonb, 'note', '${topic}')`)
  await waitUntil(() => one.length >= 2, 'a live private broadcast', () => JSON.stringify(one))
  assert.deepEqual(
    one.map((m) => [m.payload.n ?? m.payload.operation, m.meta?.replayed === true]),
    [[2, true], [4, false]],
  )
  await sb.removeAllChannels()
  await reader.removeAllChannels()
})
