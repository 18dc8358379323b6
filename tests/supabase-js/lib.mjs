// Shared helpers for the supabase-js tests (driven by tests/supabase_js.rs).
import assert from 'node:assert/strict'
import { deflateSync } from 'node:zlib'
import readline from 'node:readline'
import { createClient } from '@supabase/supabase-js'
import ws from 'ws'

export const url = process.env.SUPABASE_URL
export const anonKey = process.env.SUPABASE_ANON_KEY
export const serviceKey = process.env.SUPABASE_SERVICE_KEY
assert.ok(url && anonKey && serviceKey, 'SUPABASE_URL, SUPABASE_ANON_KEY, SUPABASE_SERVICE_KEY are set')

// Node 20 has no global WebSocket: realtime-js takes the `ws` package as its
// transport (Node 22+ needs nothing).
export function client(key = anonKey, options = {}) {
  return createClient(url, key, {
    auth: { persistSession: false, autoRefreshToken: false },
    ...options,
    realtime: { transport: ws, ...(options.realtime ?? {}) },
  })
}

export function email(tag) {
  return `${tag}-${Math.random().toString(36).slice(2, 10)}@example.com`
}

export const password = 'correct horse 1'

// Plain SQL, run by the Rust test on our behalf (changes made outside the client).
const rl = readline.createInterface({ input: process.stdin })
const answers = []
const waiting = []
rl.on('line', (line) => {
  const v = JSON.parse(line)
  const w = waiting.shift()
  if (w) w(v)
  else answers.push(v)
})
export async function sql(statement) {
  process.stdout.write(`@@sql ${JSON.stringify({ sql: statement })}\n`)
  const v = answers.length ? answers.shift() : await new Promise((r) => waiting.push(r))
  if (v.error) throw new Error(`SQL failed: ${v.error}\n${statement}`)
}

export function ok(result, what) {
  if (result.error) {
    throw new Error(`${what}: ${result.error.name ?? ''} ${result.error.message} (${JSON.stringify(result.error)})`)
  }
  return result.data
}

export async function main(name, fn) {
  try {
    await fn()
    console.log(`${name}: all checks passed`)
    rl.close()
    process.exit(0)
  } catch (e) {
    console.error(`${name}: FAILED`, e)
    process.exit(1)
  }
}

// Resolves once `cond()` is truthy (polled every 10 ms); rejects after `ms`,
// with `dump()` in the message when given.
export function waitUntil(cond, what, dump, ms = 10000) {
  return new Promise((resolve, reject) => {
    const started = Date.now()
    const tick = () => {
      let v
      try { v = cond() } catch (e) { v = false }
      if (v) return resolve(v)
      if (Date.now() - started > ms) return reject(new Error(`timed out waiting for ${what}${dump ? `: ${JSON.stringify(dump())}` : ''}`))
      setTimeout(tick, 10)
    }
    tick()
  })
}

// Subscribes `channel`; resolves on SUBSCRIBED, rejects on an error status.
export function subscribed(channel) {
  return new Promise((resolve, reject) => {
    channel.subscribe((status, err) => {
      if (status === 'SUBSCRIBED') resolve()
      else if (status !== 'CLOSED') reject(new Error(`subscribe: ${status} ${err?.message ?? ''}`))
    })
  })
}

export { assert }

// A `w` × `h` RGB PNG, made here (Node has zlib but no image library).
export function pngOf(w, h) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1
    return c >>> 0
  })
  const crc = (buf) => {
    let c = 0xffffffff
    for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8)
    return (c ^ 0xffffffff) >>> 0
  }
  const chunk = (type, data) => {
    const head = Buffer.alloc(4)
    head.writeUInt32BE(data.length)
    const body = Buffer.concat([Buffer.from(type), data])
    const tail = Buffer.alloc(4)
    tail.writeUInt32BE(crc(body))
    return Buffer.concat([head, body, tail])
  }
  const ihdr = Buffer.alloc(13)
  ihdr.writeUInt32BE(w, 0)
  ihdr.writeUInt32BE(h, 4)
  ihdr.set([8, 2, 0, 0, 0], 8)
  const rows = []
  for (let y = 0; y < h; y++) {
    rows.push(Buffer.from([0]))
    for (let x = 0; x < w; x++) rows.push(Buffer.from([(x * 6) % 256, (y * 12) % 256, 128]))
  }
  return Buffer.concat([
    Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]),
    chunk('IHDR', ihdr),
    chunk('IDAT', deflateSync(Buffer.concat(rows))),
    chunk('IEND', Buffer.alloc(0)),
  ])
}
