// Shared helpers for the supabase-js tests (driven by tests/supabase_js.rs).
import assert from 'node:assert/strict'
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
