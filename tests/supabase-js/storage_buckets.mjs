// updateBucket, emptyBucket, deleteBucket and createSignedUrls against Aether's
// /storage/v1: the bucket's owner or the service role may change a bucket.
import { assert, client, email, main, ok, password, serviceKey } from './lib.mjs'

await main('storage-buckets', async () => {
  const alice = client()
  ok(await alice.auth.signUp({ email: email('alice'), password }), 'alice signUp')
  const bob = client()
  ok(await bob.auth.signUp({ email: email('bob'), password }), 'bob signUp')
  const id = `b-${Math.random().toString(36).slice(2, 8)}`
  ok(await alice.storage.createBucket(id), 'createBucket')

  // updateBucket: public, size limit, types; only the owner (or service role).
  ok(await alice.storage.updateBucket(id, { public: true, fileSizeLimit: '2MB', allowedMimeTypes: ['text/plain'] }), 'updateBucket')
  const b = ok(await alice.storage.getBucket(id), 'getBucket')
  assert.equal(b.public, true)
  assert.equal(b.file_size_limit, 2 * 1024 * 1024)
  assert.deepEqual(b.allowed_mime_types, ['text/plain'])
  const byBob = await bob.storage.updateBucket(id, { public: false })
  assert.equal(byBob.error?.statusCode, '403', JSON.stringify(byBob.error))
  ok(await client(serviceKey).storage.updateBucket(id, { public: false }), 'updateBucket as service role')
  assert.equal(ok(await alice.storage.getBucket(id), 'getBucket 2').public, false)

  // createSignedUrls: one entry per path, an error for a missing one.
  const files = alice.storage.from(id)
  ok(await files.upload('a.txt', Buffer.from('A'), { contentType: 'text/plain' }), 'upload a')
  ok(await files.upload('b.txt', Buffer.from('B'), { contentType: 'text/plain' }), 'upload b')
  const signed = ok(await files.createSignedUrls(['a.txt', 'b.txt', 'none.txt'], 60), 'createSignedUrls')
  assert.equal(signed.length, 3)
  assert.ok(signed[0].signedUrl && signed[1].signedUrl, JSON.stringify(signed))
  assert.ok(signed[2].error && !signed[2].signedUrl, JSON.stringify(signed[2]))
  const body = await (await fetch(signed[1].signedUrl)).text()
  assert.equal(body, 'B')

  // deleteBucket refuses a bucket with files; emptyBucket empties it.
  const notEmpty = await alice.storage.deleteBucket(id)
  assert.equal(notEmpty.error?.statusCode, '409', JSON.stringify(notEmpty.error))
  assert.equal((await bob.storage.emptyBucket(id)).error?.statusCode, '403')
  ok(await alice.storage.emptyBucket(id), 'emptyBucket')
  assert.deepEqual(ok(await files.list(), 'list after empty'), [])
  ok(await alice.storage.deleteBucket(id), 'deleteBucket')
  const gone = await alice.storage.getBucket(id)
  assert.equal(gone.error?.statusCode, '404', JSON.stringify(gone.error))
  const seed = await client(serviceKey).storage.deleteBucket('files')
  assert.equal(seed.error?.statusCode, '403', 'UPLOAD_BUCKET stays')
})
