// Broadcast and presence on /realtime/v1 with the real client: two (or three)
// clients on one topic, under vsn 1.0.0 (JSON objects), 2.0.0 (arrays, and
// realtime-js's binary frames for broadcast) and the two mixed.
import { assert, client, main, subscribed, waitUntil } from './lib.mjs'

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

// One client with one channel on `topic`, recording what it hears.
async function member(vsn, topic, config) {
  const sb = client(undefined, { realtime: { vsn } })
  const heard = { msgs: [], any: [], joins: [], leaves: [], syncs: 0 }
  const ch = sb.channel(topic, { config })
    .on('broadcast', { event: 'msg' }, (p) => heard.msgs.push(p))
    .on('broadcast', { event: '*' }, (p) => heard.any.push(p))
    .on('presence', { event: 'sync' }, () => heard.syncs++)
    .on('presence', { event: 'join' }, (p) => heard.joins.push(p))
    .on('presence', { event: 'leave' }, (p) => heard.leaves.push(p))
  await subscribed(ch)
  return { sb, ch, heard }
}

async function round(vsnA, vsnB) {
  const topic = `room-${vsnA}-${vsnB}-${Math.random().toString(36).slice(2, 6)}`
  const a = await member(vsnA, topic, { broadcast: { self: true, ack: true }, presence: { key: 'alice' } })
  const b = await member(vsnB, topic, { broadcast: { self: false }, presence: { key: 'bob' } })

  // Broadcast, A (self, ack) → everyone; B (no self, no ack) → A only.
  assert.equal(await a.ch.send({ type: 'broadcast', event: 'msg', payload: { n: 1, from: 'a' } }), 'ok')
  assert.equal(await b.ch.send({ type: 'broadcast', event: 'msg', payload: { n: 2, from: 'b' } }), 'ok')
  assert.equal(await b.ch.send({ type: 'broadcast', event: 'other', payload: { n: 3 } }), 'ok')
  await waitUntil(() => a.heard.msgs.length >= 2 && b.heard.msgs.length >= 1 && a.heard.any.length >= 3, 'broadcasts')
  assert.deepEqual(a.heard.msgs.map((m) => m.payload), [{ n: 1, from: 'a' }, { n: 2, from: 'b' }])
  assert.equal(a.heard.msgs[0].type, 'broadcast')
  assert.equal(a.heard.msgs[0].event, 'msg')
  assert.deepEqual(b.heard.msgs.map((m) => m.payload), [{ n: 1, from: 'a' }])
  assert.deepEqual(a.heard.any.map((m) => m.event), ['msg', 'msg', 'other'])
  await sleep(100)
  assert.equal(b.heard.msgs.length, 1, 'no self: B does not hear itself')
  assert.equal(b.heard.any.length, 1)

  // Presence: A tracks, B sees it; B tracks, A sees both.
  assert.equal(await a.ch.track({ status: 'online', name: 'Alice' }), 'ok')
  await waitUntil(() => b.ch.presenceState().alice, 'alice in B\'s presence state')
  const [meta] = b.ch.presenceState().alice
  assert.equal(meta.status, 'online')
  assert.equal(meta.name, 'Alice')
  assert.equal(typeof meta.presence_ref, 'string')
  assert.ok(b.heard.joins.some((j) => j.key === 'alice' && j.newPresences[0].status === 'online'), 'B: join callback')
  assert.ok(b.heard.syncs > 0, 'B: sync callback')
  await waitUntil(() => a.ch.presenceState().alice, 'alice in her own presence state')
  assert.equal(await b.ch.track({ status: 'away' }), 'ok')
  await waitUntil(() => a.ch.presenceState().bob, 'bob in A\'s presence state')
  assert.deepEqual(Object.keys(a.ch.presenceState()).sort(), ['alice', 'bob'])

  // A third client joining later gets the whole state at once.
  const c = await member(vsnB, topic, { presence: { key: 'carol' } })
  await waitUntil(() => c.ch.presenceState().alice && c.ch.presenceState().bob, 'state for a late joiner')
  assert.equal(c.ch.presenceState().bob[0].status, 'away')

  // Track again: the key keeps one meta, with the new state.
  assert.equal(await a.ch.track({ status: 'busy', name: 'Alice' }), 'ok')
  await waitUntil(() => b.ch.presenceState().alice?.[0]?.status === 'busy', 'alice busy')
  assert.equal(b.ch.presenceState().alice.length, 1)

  // Untrack → leave.
  assert.equal(await a.ch.untrack(), 'ok')
  await waitUntil(() => !b.ch.presenceState().alice, 'alice gone after untrack')
  assert.ok(b.heard.leaves.some((l) => l.key === 'alice' && l.leftPresences[0].status === 'busy'), 'B: leave callback')
  assert.ok(!c.ch.presenceState().alice)

  // Disconnect → leave.
  assert.equal(await a.ch.track({ status: 'back' }), 'ok')
  await waitUntil(() => b.ch.presenceState().alice?.[0]?.status === 'back', 'alice back')
  a.sb.realtime.disconnect()
  await waitUntil(() => !b.ch.presenceState().alice && !c.ch.presenceState().alice, 'alice gone after disconnect')
  assert.deepEqual(Object.keys(b.ch.presenceState()), ['bob'])

  // Leaving the channel (removeChannel) → leave too.
  await b.sb.removeChannel(b.ch)
  await waitUntil(() => !c.ch.presenceState().bob, 'bob gone after leaving')
  assert.deepEqual(c.ch.presenceState(), {})

  b.sb.realtime.disconnect()
  c.sb.realtime.disconnect()
}

await main('broadcast', async () => {
  for (const [vsnA, vsnB] of [['1.0.0', '1.0.0'], ['2.0.0', '2.0.0'], ['1.0.0', '2.0.0'], ['2.0.0', '1.0.0']]) {
    await round(vsnA, vsnB)
  }

  // vsn 2.0.0 binary payloads (an ArrayBuffer) reach vsn 2.0.0 clients as bytes.
  const topic = `bin-${Math.random().toString(36).slice(2, 6)}`
  const a = await member('2.0.0', topic, { broadcast: { ack: true } })
  const b = await member('2.0.0', topic, {})
  const bytes = new Uint8Array([0, 1, 2, 250, 255])
  assert.equal(await a.ch.send({ type: 'broadcast', event: 'msg', payload: bytes.buffer }), 'ok')
  await waitUntil(() => b.heard.msgs.length === 1, 'binary broadcast')
  assert.deepEqual([...new Uint8Array(b.heard.msgs[0].payload)], [...bytes])
  a.sb.realtime.disconnect()

  // REST: httpSend, and send() on a channel not joined (its fallback to
  // POST /realtime/v1/api/broadcast), reach the subscribed client.
  const rest = client()
  const rch = rest.channel(topic)
  assert.deepEqual(await rch.httpSend('msg', { via: 'httpSend' }), { success: true })
  assert.deepEqual(await rch.httpSend('msg', new Uint8Array([7, 8]).buffer), { success: true })
  const warn = console.warn
  console.warn = () => {}
  try {
    assert.equal(await rch.send({ type: 'broadcast', event: 'msg', payload: { via: 'fallback' } }), 'ok')
  } finally {
    console.warn = warn
  }
  await waitUntil(() => b.heard.msgs.length === 4, 'REST broadcasts')
  assert.deepEqual(b.heard.msgs[1].payload, { via: 'httpSend' })
  assert.deepEqual([...new Uint8Array(b.heard.msgs[2].payload)], [7, 8])
  assert.deepEqual(b.heard.msgs[3].payload, { via: 'fallback' })
  const bad = await fetch(`${process.env.SUPABASE_URL}/realtime/v1/api/broadcast`, {
    method: 'POST', headers: { 'content-type': 'application/json', apikey: 'nope' },
    body: JSON.stringify({ messages: [{ topic, event: 'msg', payload: {} }] }),
  })
  assert.equal(bad.status, 401)
  await assert.rejects(client(undefined).channel(topic, { config: { private: true } }).httpSend('msg', {}), /Unauthorized/)
  b.sb.realtime.disconnect()
})
