// The object calls beyond upload/download against Aether's /storage/v1: bucket
// rules (any type by default), custom metadata, info/exists, move, copy,
// signed upload URLs and listV2. The server runs with the default
// ALLOWED_FILE_TYPES (no text/plain) and a 1 MB quota (tests/supabase_js.rs).
import { assert, client, email, main, ok, password, serviceKey, url, anonKey } from './lib.mjs'

await main('storage-objects', async () => {
  const alice = client()
  ok(await alice.auth.signUp({ email: email('alice'), password }), 'alice signUp')
  const bob = client()
  ok(await bob.auth.signUp({ email: email('bob'), password }), 'bob signUp')
  const service = client(serviceKey)
  const token = (await alice.auth.getSession()).data.session.access_token
  const tag = Math.random().toString(36).slice(2, 8)
  const bucket = `obj-${tag}`
  ok(await alice.storage.createBucket(bucket), 'createBucket')
  const files = alice.storage.from(bucket)
  const text = async (r, what) => ok(await r, what).text()

  // 1. Bucket rules: any type unless the bucket lists some (ALLOWED_FILE_TYPES
  // is the seed route's rule only), and the bucket's size limit.
  ok(await files.upload('notes/a.txt', Buffer.from('hello'), { contentType: 'text/plain' }), 'text/plain upload')
  ok(await alice.storage.from('files').upload(`t-${tag}.txt`, Buffer.from('x'), { contentType: 'text/plain' }), 'text/plain to UPLOAD_BUCKET')
  const png = `png-${tag}`
  ok(await alice.storage.createBucket(png, { allowedMimeTypes: ['image/png'], fileSizeLimit: 10 }), 'createBucket png')
  const pngFiles = alice.storage.from(png)
  const refused = await pngFiles.upload('a.txt', Buffer.from('hi'), { contentType: 'text/plain' })
  assert.equal(refused.error?.statusCode, '415', JSON.stringify(refused.error))
  assert.equal(refused.error?.status, 415)
  assert.match(refused.error.message, /text\/plain/)
  const refusedBlob = await pngFiles.upload('b.txt', new Blob(['hi'], { type: 'text/plain' }))
  assert.equal(refusedBlob.error?.statusCode, '415', JSON.stringify(refusedBlob.error))
  ok(await pngFiles.upload('a.png', Buffer.from([137, 80, 78, 71]), { contentType: 'image/png' }), 'png upload')
  const tooBig = await pngFiles.upload('big.png', Buffer.alloc(11), { contentType: 'image/png' })
  assert.equal(tooBig.error?.statusCode, '413', JSON.stringify(tooBig.error))

  // 2 and 3. Custom metadata (x-metadata for a Buffer, a form field for a
  // Blob), returned by info() and by list() as user_metadata; exists().
  ok(await files.upload('meta/raw.txt', Buffer.from('raw'), { contentType: 'text/plain', metadata: { by: 'alice', n: 1 } }), 'upload with metadata')
  ok(await files.upload('meta/form.bin', new Blob([new Uint8Array([1, 2])]), { metadata: { kind: 'form' } }), 'Blob upload with metadata')
  const info = ok(await files.info('meta/raw.txt'), 'info')
  assert.equal(info.name, 'meta/raw.txt')
  assert.equal(info.bucketId, bucket)
  assert.equal(info.size, 3)
  assert.equal(info.contentType, 'text/plain')
  assert.deepEqual(info.metadata, { by: 'alice', n: 1 })
  assert.ok(info.id && info.version && info.etag && info.lastModified && info.createdAt, JSON.stringify(info))
  assert.deepEqual(ok(await files.info('meta/form.bin'), 'info form').metadata, { kind: 'form' })
  assert.equal(ok(await files.info('notes/a.txt'), 'info plain').metadata, null)
  assert.equal((await bob.storage.from(bucket).info('meta/raw.txt')).error?.statusCode, '404')
  const listed = ok(await files.list('meta'), 'list meta')
  assert.deepEqual(listed.find((e) => e.name === 'raw.txt').user_metadata, { by: 'alice', n: 1 })
  assert.equal(listed.find((e) => e.name === 'raw.txt').metadata.size, 3)
  assert.equal(ok(await files.exists('meta/raw.txt'), 'exists'), true)
  const none = await files.exists('meta/none.txt')
  assert.equal(none.data, false)
  // A bad x-metadata is refused in the storage API's error shape.
  let res = await fetch(`${url}/storage/v1/object/${bucket}/meta/bad.txt`, {
    method: 'POST',
    headers: { apikey: anonKey, authorization: `Bearer ${token}`, 'content-type': 'text/plain', 'x-metadata': '!!!' },
    body: 'x',
  })
  assert.equal(res.status, 400)
  assert.equal((await res.json()).statusCode, '400')
  res = await fetch(`${url}/storage/v1/object/${bucket}/meta/bad.txt`, {
    method: 'POST',
    headers: { apikey: anonKey, authorization: `Bearer ${token}`, 'content-type': 'text/plain', 'x-metadata': Buffer.from('[1]').toString('base64') },
    body: 'x',
  })
  assert.equal(res.status, 400, 'metadata must be an object')

  // 4. move: the row keeps its id, bytes and metadata; empty folders go.
  const before = ok(await files.info('meta/raw.txt'), 'info before move')
  assert.equal(ok(await files.move('meta/raw.txt', 'moved/raw.txt'), 'move').message, 'Successfully moved')
  assert.equal(await text(files.download('moved/raw.txt'), 'download moved'), 'raw')
  assert.equal((await files.download('meta/raw.txt')).error?.statusCode, '404')
  const after = ok(await files.info('moved/raw.txt'), 'info after move')
  assert.equal(after.id, before.id)
  assert.deepEqual(after.metadata, { by: 'alice', n: 1 })
  assert.deepEqual(ok(await files.list('meta'), 'list after move').map((e) => e.name), ['form.bin'])
  assert.equal((await files.move('notes/a.txt', 'meta/form.bin')).error?.statusCode, '409', 'destination taken')
  assert.equal((await files.move('nothing.txt', 'x.txt')).error?.statusCode, '404')
  assert.equal((await bob.storage.from(bucket).move('moved/raw.txt', 'bob.txt')).error?.statusCode, '404', 'not bob\'s')
  ok(await service.storage.from(bucket).move('moved/raw.txt', 'svc/raw.txt'), 'service move')
  assert.equal(await text(files.download('svc/raw.txt'), 'still alice\'s'), 'raw')
  assert.deepEqual(ok(await files.list(), 'root after moves').map((e) => e.name), ['meta', 'notes', 'svc'])
  const wrongType = await files.move('notes/a.txt', 'a.txt', { destinationBucket: png })
  assert.equal(wrongType.error?.statusCode, '415', 'the destination bucket\'s rules apply')
  ok(await files.move('notes/a.txt', 'a.txt', { destinationBucket: 'files' }), 'move across buckets')
  assert.equal(await text(alice.storage.from('files').download('a.txt'), 'download in files'), 'hello')

  // 5. copy: new row, copied bytes and metadata, quota counted.
  const copied = ok(await files.copy('svc/raw.txt', 'copies/raw.txt'), 'copy')
  assert.equal(copied.path, `${bucket}/copies/raw.txt`)
  const copyInfo = ok(await files.info('copies/raw.txt'), 'info copy')
  assert.notEqual(copyInfo.id, after.id)
  assert.deepEqual(copyInfo.metadata, { by: 'alice', n: 1 })
  assert.equal((await files.copy('svc/raw.txt', 'copies/raw.txt')).error?.statusCode, '409')
  ok(await files.remove(['svc/raw.txt']), 'remove the original')
  assert.equal(await text(files.download('copies/raw.txt'), 'the copy has its own bytes'), 'raw')
  assert.equal((await bob.storage.from(bucket).copy('copies/raw.txt', 'mine.txt')).error?.statusCode, '404')
  ok(await files.copy('copies/raw.txt', 'raw.txt', { destinationBucket: 'files' }), 'copy across buckets')
  assert.equal(await text(alice.storage.from('files').download('raw.txt'), 'copy in files'), 'raw')
  ok(await files.upload('q/big.bin', Buffer.alloc(400_000)), 'upload 400 kB')
  ok(await files.copy('q/big.bin', 'q/big2.bin'), 'copy 400 kB')
  const overQuota = await files.copy('q/big.bin', 'q/big3.bin')
  assert.equal(overQuota.error?.statusCode, '413', JSON.stringify(overQuota.error))
  ok(await files.remove(['q/big.bin', 'q/big2.bin']), 'free the quota')

  // 6. Signed upload URLs: no key needed, one path, the signer's object.
  const su = ok(await files.createSignedUploadUrl('signed/up.txt'), 'createSignedUploadUrl')
  assert.ok(su.token && su.signedUrl.includes(`/object/upload/sign/${bucket}/signed/up.txt?token=`), JSON.stringify(su))
  const stranger = client()
  const up = ok(await stranger.storage.from(bucket).uploadToSignedUrl('signed/up.txt', su.token, Buffer.from('via token'), { contentType: 'text/plain', metadata: { via: 'token' } }), 'uploadToSignedUrl')
  assert.equal(up.fullPath, `${bucket}/signed/up.txt`)
  assert.equal(await text(files.download('signed/up.txt'), 'alice owns it'), 'via token')
  assert.deepEqual(ok(await files.info('signed/up.txt'), 'info signed').metadata, { via: 'token' })
  const su2 = ok(await files.createSignedUploadUrl('signed/raw.txt'), 'createSignedUploadUrl 2')
  res = await fetch(su2.signedUrl, { method: 'PUT', body: 'no headers at all', headers: { 'content-type': 'text/plain' } })
  assert.equal(res.status, 200, await res.clone().text())
  assert.equal((await res.json()).Key, `${bucket}/signed/raw.txt`)
  assert.equal(await text(files.download('signed/raw.txt'), 'raw fetch upload'), 'no headers at all')
  const otherPath = await stranger.storage.from(bucket).uploadToSignedUrl('signed/other.txt', su.token, Buffer.from('x'))
  assert.equal(otherPath.error?.statusCode, '400', 'a token is for one path')
  assert.equal((await files.download('signed/other.txt')).error?.statusCode, '404')
  const again = await stranger.storage.from(bucket).uploadToSignedUrl('signed/up.txt', su.token, Buffer.from('x'))
  assert.equal(again.error?.statusCode, '409', 'no upsert: the object is not replaced')
  assert.equal((await files.createSignedUploadUrl('signed/up.txt')).error?.statusCode, '409')
  const su3 = ok(await files.createSignedUploadUrl('signed/up.txt', { upsert: true }), 'sign with upsert')
  ok(await stranger.storage.from(bucket).uploadToSignedUrl('signed/up.txt', su3.token, Buffer.from('replaced')), 'upsert via token')
  assert.equal(await text(files.download('signed/up.txt'), 'replaced'), 'replaced')
  // Download and upload tokens are not interchangeable.
  const dl = ok(await files.createSignedUrl('signed/up.txt', 60), 'createSignedUrl')
  const dlToken = new URL(dl.signedUrl).searchParams.get('token')
  const withDl = await stranger.storage.from(bucket).uploadToSignedUrl('signed/up.txt', dlToken, Buffer.from('x'), { upsert: true })
  assert.equal(withDl.error?.statusCode, '400', 'a download token does not upload')
  res = await fetch(`${url}/storage/v1/object/sign/${bucket}/signed/up.txt?token=${su3.token}`)
  assert.equal(res.status, 400, 'an upload token does not download')
  const tampered = await stranger.storage.from(bucket).uploadToSignedUrl('signed/up.txt', su3.token.slice(0, -4) + 'AAAA', Buffer.from('x'))
  assert.equal(tampered.error?.statusCode, '400')
  assert.ok((await client().storage.from(bucket).createSignedUploadUrl('anon.txt')).error, 'the anon key signs no upload')

  // 7. listV2: flat or one level, cursors, order.
  for (const p of ['v2/a.txt', 'v2/b.txt', 'v2/sub/c.txt', 'v2/sub/deeper/d.txt']) {
    ok(await files.upload(p, Buffer.from(p), { contentType: 'text/plain' }), `upload ${p}`)
  }
  const names = (page) => [page.folders.map((f) => f.name), page.objects.map((o) => o.name)]
  let page = ok(await files.listV2({ prefix: 'v2/' }), 'listV2 flat')
  assert.deepEqual(names(page), [[], ['v2/a.txt', 'v2/b.txt', 'v2/sub/c.txt', 'v2/sub/deeper/d.txt']])
  assert.equal(page.hasNext, false)
  assert.equal(page.objects[0].metadata.size, 8)
  page = ok(await files.listV2({ prefix: 'v2/', with_delimiter: true }), 'listV2 delimited')
  assert.deepEqual(names(page), [['v2/sub/'], ['v2/a.txt', 'v2/b.txt']])
  page = ok(await files.listV2({ prefix: 'v2/s', with_delimiter: true }), 'listV2 string prefix')
  assert.deepEqual(names(page), [['v2/sub/'], []])
  page = ok(await files.listV2({ prefix: 'v2/', limit: 3 }), 'listV2 page 1')
  assert.deepEqual(names(page)[1], ['v2/a.txt', 'v2/b.txt', 'v2/sub/c.txt'])
  assert.equal(page.hasNext, true)
  page = ok(await files.listV2({ prefix: 'v2/', limit: 3, cursor: page.nextCursor }), 'listV2 page 2')
  assert.deepEqual(names(page), [[], ['v2/sub/deeper/d.txt']])
  assert.equal(page.hasNext, false)
  const seen = []
  let cursor
  do {
    page = ok(await files.listV2({ prefix: 'v2/', with_delimiter: true, limit: 1, cursor }), 'listV2 delimited page')
    seen.push(...page.folders.map((f) => f.name), ...page.objects.map((o) => o.name))
    cursor = page.nextCursor
  } while (page.hasNext)
  assert.deepEqual(seen, ['v2/a.txt', 'v2/b.txt', 'v2/sub/'])
  page = ok(await files.listV2({ prefix: 'v2/', sortBy: { column: 'name', order: 'desc' }, limit: 2 }), 'listV2 desc')
  assert.deepEqual(names(page)[1], ['v2/sub/deeper/d.txt', 'v2/sub/c.txt'])
  page = ok(await files.listV2({ prefix: 'v2/', sortBy: { column: 'name', order: 'desc' }, limit: 2, cursor: page.nextCursor }), 'listV2 desc 2')
  assert.deepEqual(names(page)[1], ['v2/b.txt', 'v2/a.txt'])
  page = ok(await files.listV2({ prefix: 'v2/', sortBy: { column: 'created_at' }, limit: 2 }), 'listV2 by time')
  page = ok(await files.listV2({ prefix: 'v2/', sortBy: { column: 'created_at' }, limit: 2, cursor: page.nextCursor }), 'listV2 by time 2')
  assert.equal(page.objects.length, 2)
  assert.deepEqual(names(ok(await bob.storage.from(bucket).listV2({ prefix: 'v2/' }), 'bob listV2')), [[], []])
  assert.equal(ok(await service.storage.from(bucket).listV2({ prefix: 'v2/' }), 'service listV2').objects.length, 4)
  const badCursor = await files.listV2({ cursor: 'nope' })
  assert.equal(badCursor.error?.statusCode, '400')
})
