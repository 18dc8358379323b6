// The object calls beyond upload/download against Aether's /storage/v1: bucket
// rules (any type by default), custom metadata, info/exists, move, copy,
// signed upload URLs, listV2 and service-role (owner-less) objects. The
// server runs with the default ALLOWED_FILE_TYPES (no text/plain) and a 1 MB
// quota (tests/supabase_js.rs).
import { assert, client, email, main, ok, password, serviceKey, sql, url, anonKey, pngOf } from './lib.mjs'

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
  // cacheControl: as a raw body's `cache-control` header (storage-js's
  // default, 3600) and as a Blob's form field; reported and served.
  assert.equal(info.cacheControl, 'max-age=3600')
  ok(await files.upload('cc/cached.bin', new Blob([new Uint8Array([3])]), { cacheControl: '120' }), 'Blob upload with cacheControl')
  assert.equal(ok(await files.info('cc/cached.bin'), 'info cached').cacheControl, 'max-age=120')
  const served = await fetch(`${url}/storage/v1/object/${bucket}/cc/cached.bin`, {
    headers: { apikey: anonKey, authorization: `Bearer ${token}` },
  })
  assert.equal(served.status, 200)
  assert.equal(served.headers.get('cache-control'), 'private, max-age=120')
  assert.equal(ok(await files.list('cc'), 'list cc')[0].metadata.cacheControl, 'max-age=120')
  ok(await files.remove(['cc/cached.bin']), 'remove cached')
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

  // 8. Service-role uploads: owner-less objects, which no user owns and whose
  // bytes count against no quota.
  const svcFiles = service.storage.from(bucket)
  const bobFiles = bob.storage.from(bucket)
  const q1 = ok(await svcFiles.upload('reports/q1.txt', Buffer.from('quarter one'), { contentType: 'text/plain', metadata: { by: 'server' } }), 'service upload')
  assert.equal(q1.fullPath, `${bucket}/reports/q1.txt`)
  assert.equal(await text(svcFiles.download('reports/q1.txt'), 'service download'), 'quarter one')
  const q1Info = ok(await svcFiles.info('reports/q1.txt'), 'service info')
  assert.equal(q1Info.size, 11)
  assert.deepEqual(q1Info.metadata, { by: 'server' })
  // Only the service role wrote it: the row has no owner.
  const rows = ok(await service.from('files').select('owner_id, storage_key').eq('id', q1Info.id), 'files row')
  assert.equal(rows.length, 1)
  assert.equal(rows[0].owner_id, null)
  assert.match(rows[0].storage_key, /^service\//)
  // The bucket is private: users cannot read, info or list it...
  assert.equal((await bobFiles.download('reports/q1.txt')).error?.statusCode, '404', 'bob cannot download it')
  assert.equal((await files.download('reports/q1.txt')).error?.statusCode, '404', 'nor can the bucket\'s owner')
  assert.equal((await bobFiles.info('reports/q1.txt')).error?.statusCode, '404')
  assert.deepEqual(ok(await bobFiles.list('reports'), 'bob list'), [])
  assert.equal((await bobFiles.createSignedUrl('reports/q1.txt', 60)).error?.statusCode, '404', 'bob cannot sign it')
  // ...but a signed URL the service role made works for anyone holding it.
  const signed = ok(await svcFiles.createSignedUrl('reports/q1.txt', 60), 'service createSignedUrl')
  res = await fetch(signed.signedUrl)
  assert.equal(res.status, 200)
  assert.equal(await res.text(), 'quarter one')
  const many = ok(await svcFiles.createSignedUrls(['reports/q1.txt'], 60), 'service createSignedUrls')
  assert.equal(many[0].error, null)
  // Users cannot replace, move or remove it.
  assert.equal((await bobFiles.move('reports/q1.txt', 'mine.txt')).error?.statusCode, '404')
  assert.equal((await bobFiles.copy('reports/q1.txt', 'mine.txt')).error?.statusCode, '404')
  assert.deepEqual(ok(await bobFiles.remove(['reports/q1.txt']), 'bob remove'), [])
  // One object per bucket and name, as on Supabase: the name is taken, so
  // bob's upload there is refused (409), and his upsert too (403: not his).
  assert.equal((await bobFiles.upload('reports/q1.txt', Buffer.from('bob\'s own'))).error?.statusCode, '409', 'the name is taken')
  assert.equal((await bobFiles.upload('reports/q1.txt', Buffer.from('bob\'s own'), { upsert: true })).error?.statusCode, '403', 'not bob\'s to replace')
  assert.equal((await bobFiles.createSignedUploadUrl('reports/q1.txt', { upsert: true })).error?.statusCode, '403')
  ok(await bobFiles.upload('reports/bob.txt', Buffer.from('bob\'s own'), { contentType: 'text/plain' }), 'bob upload')
  // x-upsert replaces the service role's object; without it, 409.
  assert.equal((await svcFiles.upload('reports/q1.txt', Buffer.from('x'))).error?.statusCode, '409')
  ok(await svcFiles.upload('reports/q1.txt', Buffer.from('quarter one, v2'), { contentType: 'text/plain', upsert: true }), 'service upsert')
  assert.equal(await text(svcFiles.download('reports/q1.txt'), 'replaced'), 'quarter one, v2')
  assert.equal(ok(await svcFiles.info('reports/q1.txt'), 'info after upsert').id, q1Info.id)
  // The service role lists everyone's objects; bob his own.
  assert.deepEqual(ok(await svcFiles.list('reports'), 'service list').map((e) => e.name), ['bob.txt', 'q1.txt'])
  assert.deepEqual(ok(await bobFiles.list('reports'), 'bob list').map((e) => e.name), ['bob.txt'])
  assert.ok(ok(await svcFiles.listV2({ prefix: 'reports/' }), 'service listV2').objects.some((o) => o.id === q1Info.id))
  // It moves its object (which keeps no owner) and copies it (a copy is the
  // copier's: owner-less too).
  ok(await svcFiles.move('reports/q1.txt', 'archive/q1.txt'), 'service move')
  ok(await svcFiles.copy('archive/q1.txt', 'reports/q1-copy.txt'), 'service copy')
  const moved = ok(await service.from('files').select('owner_id, path').in('path', ['archive/q1.txt', 'reports/q1-copy.txt']).eq('bucket_id', bucket), 'moved rows')
  assert.equal(moved.length, 2)
  assert.ok(moved.every((r) => r.owner_id === null), JSON.stringify(moved))
  // No quota: the server's is 1 MB, the service role stores more, and bob can
  // still upload (his own quota is untouched).
  ok(await svcFiles.upload('reports/big.bin', Buffer.alloc(1_200_000)), 'service upload over 1 MB')
  ok(await svcFiles.copy('reports/big.bin', 'reports/big2.bin'), 'service copy over 1 MB')
  ok(await bobFiles.upload('reports/bob-big.bin', Buffer.alloc(500_000)), 'bob still has his quota')
  // The service role removes what it stored; bob's object stays.
  const removed = ok(await svcFiles.remove(['archive/q1.txt', 'reports/q1-copy.txt', 'reports/big.bin', 'reports/big2.bin']), 'service remove')
  assert.equal(removed.length, 4)
  assert.equal((await svcFiles.info('archive/q1.txt')).error?.statusCode, '404')
  // The service role may replace a user's object, which stays the user's.
  ok(await svcFiles.upload('reports/bob.txt', Buffer.from('for bob'), { upsert: true }), 'service upsert of bob\'s object')
  assert.equal(await text(bobFiles.download('reports/bob.txt'), 'bob\'s replaced'), 'for bob')
  const bobRow = ok(await service.from('files').select('owner_id').eq('bucket_id', bucket).eq('path', 'reports/bob.txt'), 'bob row')
  assert.equal(bobRow[0].owner_id, (await bob.auth.getUser()).data.user.id)

  // 9. Users' folders: `<user id>/…` is its user's. Nobody else creates
  // there (403), and it is where the seed routes keep the user's files, so
  // one object is one file in both APIs.
  const aliceId = (await alice.auth.getUser()).data.user.id
  assert.equal((await bobFiles.upload(`${aliceId}/planted.txt`, Buffer.from('x'))).error?.statusCode, '403', 'not in alice\'s folder')
  ok(await files.upload(`${aliceId}/docs/from-js.txt`, Buffer.from('from js'), { contentType: 'text/plain' }), 'alice in her folder')
  // Her folder's own name is hers too (nobody blocks it with a file), and a
  // name in it is 403 to bob whether or not it is taken (nothing told).
  assert.equal((await bobFiles.upload(aliceId, Buffer.from('x'))).error?.statusCode, '403', 'not the folder\'s name')
  assert.equal((await bobFiles.upload(`${aliceId}/docs/from-js.txt`, Buffer.from('x'))).error?.statusCode, '403', 'taken or not: 403')
  assert.equal((await bobFiles.move('reports/bob.txt', `${aliceId}/moved.txt`)).error?.statusCode, '403', 'nor moved into it')
  res = await fetch(`${url}/storage/list?bucket=${bucket}&path=docs`, { headers: { authorization: `Bearer ${token}` } })
  assert.equal(res.status, 200)
  const seedList = await res.json()
  assert.deepEqual(seedList.files.map((f) => f.path), ['docs/from-js.txt'], JSON.stringify(seedList))
  const form = new FormData()
  form.append('bucket', bucket)
  form.append('path', 'docs/from-seed.pdf')
  form.append('file', new Blob([Buffer.from('%PDF-1.4 seed')], { type: 'application/pdf' }), 'from-seed.pdf')
  res = await fetch(`${url}/storage/upload`, { method: 'POST', headers: { authorization: `Bearer ${token}` }, body: form })
  assert.equal(res.status, 201, await res.clone().text())
  assert.equal((await res.json()).path, 'docs/from-seed.pdf')
  assert.equal(await text(files.download(`${aliceId}/docs/from-seed.pdf`), 'the seed upload through supabase-js'), '%PDF-1.4 seed')
  assert.deepEqual(ok(await files.list(`${aliceId}/docs`), 'alice lists her folder').map((e) => e.name), ['from-js.txt', 'from-seed.pdf'])
  assert.ok(ok(await svcFiles.list(''), 'service lists the root').some((e) => e.name === aliceId && e.id === null), 'alice\'s folder at the root')

  // 10. Per-bucket access is RLS policies on public.files, as on Supabase
  // (there on storage.objects): the storage routes run as the caller, so a
  // DBA's policies widen or narrow Aether's defaults.
  const team = `team-${tag}`
  ok(await service.storage.createBucket(team), 'team bucket')
  const aliceTeam = alice.storage.from(team)
  const bobTeam = bob.storage.from(team)
  ok(await aliceTeam.upload('plan.txt', Buffer.from('the plan'), { contentType: 'text/plain' }), 'alice in team')
  assert.equal((await bobTeam.download('plan.txt')).error?.statusCode, '404', 'not bob\'s before the policy')
  await sql(`CREATE POLICY "team reads" ON public.files FOR SELECT TO authenticated USING (bucket_id = '${team}')`)
  assert.equal(await text(bobTeam.download('plan.txt'), 'bob reads with the policy'), 'the plan')
  assert.equal(ok(await bobTeam.info('plan.txt'), 'bob info').size, 8)
  assert.deepEqual(ok(await bobTeam.list(), 'bob lists the team bucket').map((e) => e.name), ['plan.txt'])
  ok(await bobTeam.createSignedUrl('plan.txt', 60), 'bob signs it')
  ok(await bobTeam.copy('plan.txt', 'bob-plan.txt'), 'bob copies it (his own copy)')
  // Reading is all the policy gives: still alice's to change.
  assert.deepEqual(ok(await bobTeam.remove(['plan.txt']), 'bob remove'), [])
  assert.equal((await bobTeam.upload('plan.txt', Buffer.from('x'), { upsert: true })).error?.statusCode, '403')
  assert.equal((await bobTeam.move('plan.txt', 'moved.txt')).error?.statusCode, '403')
  // A restrictive policy: no new objects in the bucket, whoever asks, but the
  // service role (which policies do not judge).
  await sql(`CREATE POLICY "team is closed" ON public.files AS RESTRICTIVE FOR INSERT TO authenticated WITH CHECK (bucket_id <> '${team}')`)
  assert.equal((await aliceTeam.upload('new.txt', Buffer.from('x'))).error?.statusCode, '403', 'closed to alice')
  assert.equal((await aliceTeam.createSignedUploadUrl('new.txt')).error?.statusCode, '403')
  ok(await service.storage.from(team).upload('new.txt', Buffer.from('from the server')), 'the service role is not judged')
  ok(await aliceTeam.upload('plan.txt', Buffer.from('plan v2'), { upsert: true }), 'replacing is an UPDATE: still allowed')
  assert.equal((await aliceTeam.move('plan.txt', 'plan-2.txt')).error?.statusCode, '403', 'a move is judged as an insert at its new name')
  ok(await files.upload('to-team.txt', Buffer.from('t'), { contentType: 'text/plain' }), 'an object to move in')
  assert.equal((await files.move('to-team.txt', 'to-team.txt', { destinationBucket: team })).error?.statusCode, '403', 'nor moved in from another bucket')
  // Supabase's own example policy, names ported (`name` is `path`, `owner`
  // is `owner_id`): only images in the bucket's `avatars` folder.
  await sql(`DROP POLICY "team is closed" ON public.files;
             CREATE POLICY "images only" ON public.files AS RESTRICTIVE FOR INSERT TO authenticated
               WITH CHECK (bucket_id <> '${team}' OR ((storage.foldername(path))[1] = 'avatars' AND storage.extension(path) = 'png'))`)
  assert.equal((await aliceTeam.upload('avatars/a.txt', Buffer.from('x'))).error?.statusCode, '403')
  ok(await aliceTeam.upload('avatars/a.png', Buffer.from([137, 80, 78, 71]), { contentType: 'image/png' }), 'a png in avatars')
  // Whether the policies are in place is asked again within seconds: with
  // RLS off on public.files, Aether's own rules apply (never every row).
  const until = async (cond, what) => {
    const deadline = Date.now() + 15000
    while (!(await cond())) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
      await new Promise((r) => setTimeout(r, 100))
    }
  }
  await sql(`ALTER TABLE public.files DISABLE ROW LEVEL SECURITY`)
  await until(async () => (await bobTeam.download('plan.txt')).error?.statusCode === '404', 'Aether\'s rules, RLS off')
  await sql(`ALTER TABLE public.files ENABLE ROW LEVEL SECURITY`)
  await until(async () => !(await bobTeam.download('plan.txt')).error, 'the policies, RLS on again')
  await sql(`DROP POLICY "images only" ON public.files; DROP POLICY "team reads" ON public.files`)
  assert.equal((await bobTeam.download('plan.txt')).error?.statusCode, '404', 'the policy gone, so is bob\'s access')
  // Policies see the caller's claims as in their token: the email too.
  const bobEmail = (await bob.auth.getUser()).data.user.email
  await sql(`CREATE POLICY "by email" ON public.files FOR SELECT TO authenticated
               USING (bucket_id = '${team}' AND auth.jwt() ->> 'email' = '${bobEmail}')`)
  assert.equal(await text(bobTeam.download('plan.txt'), 'bob reads by his email'), 'plan v2')
  assert.equal((await client().storage.from(team).download('plan.txt')).error?.statusCode, '404', 'anon has no email')
  await sql(`DROP POLICY "by email" ON public.files`)

  // 11. Aether's own tables through /rest/v1: what a realtime subscription
  // shows, read-only.
  const bobId = (await bob.auth.getUser()).data.user.id
  const bobRows = ok(await bob.from('files').select('id, owner_id, path, size').eq('bucket_id', bucket), 'bob reads his rows')
  assert.ok(bobRows.length > 0 && bobRows.every((r) => r.owner_id === bobId), JSON.stringify(bobRows))
  const aliceRows = ok(await alice.from('files').select('owner_id').eq('bucket_id', bucket), 'alice reads hers')
  assert.ok(aliceRows.every((r) => r.owner_id === aliceId))
  assert.deepEqual(ok(await client().from('files').select('id').eq('bucket_id', bucket), 'anon reads a private bucket'), [])
  const write = await bob.from('files').update({ name: 'x' }).eq('bucket_id', bucket)
  assert.equal(write.error?.code, '42501', JSON.stringify(write))
  assert.equal((await bob.from('files').delete().eq('owner_id', bobId)).error?.code, '42501')
  assert.equal(ok(await bob.from('files').select('id').eq('bucket_id', bucket), 'nothing went').length, bobRows.length)
  const buckets = ok(await bob.from('buckets').select('id, public'), 'bob reads buckets')
  assert.ok(buckets.every((b) => b.public || b.id !== bucket), 'alice\'s private bucket is not his to see')
  const events = ok(await bob.from('auth_events').select('user_id, event_type'), 'bob reads his auth events')
  assert.ok(events.length > 0 && events.every((e) => e.user_id === bobId))
  assert.equal((await bob.from('auth_events').select('ip')).error?.code, '42501', 'addresses stay inside')
  assert.equal((await bob.from('shares').select('id')).error?.code, '42501', 'shares: the service role only')

  // 12. copy's body fields that storage-js 2.109 does not send:
  // copyMetadata (default true) and the copy's own metadata.
  ok(await files.upload('cm/src.txt', Buffer.from('src'), { contentType: 'text/plain', metadata: { a: 1 } }), 'copy source')
  const copyRaw = (body) => fetch(`${url}/storage/v1/object/copy`, {
    method: 'POST',
    headers: { apikey: anonKey, authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ bucketId: bucket, sourceKey: 'cm/src.txt', ...body }),
  })
  res = await copyRaw({ destinationKey: 'cm/bare.json', copyMetadata: false, metadata: { mimetype: 'Application/JSON', cacheControl: '60' } })
  assert.equal(res.status, 200, await res.clone().text())
  const bare = ok(await files.info('cm/bare.json'), 'info bare copy')
  assert.equal(bare.metadata, null)
  assert.equal(bare.contentType, 'application/json')
  assert.equal(bare.cacheControl, 'max-age=60')
  res = await copyRaw({ destinationKey: 'cm/full.txt' })
  assert.equal(res.status, 200)
  const full = ok(await files.info('cm/full.txt'), 'info full copy')
  assert.deepEqual(full.metadata, { a: 1 })
  assert.equal(full.contentType, 'text/plain')
  res = await copyRaw({ destinationKey: 'cm/bad.txt', metadata: { mimetype: 'not a type' } })
  assert.equal(res.status, 400)
  assert.equal((await files.info('cm/bad.txt')).error?.statusCode, '404', 'a refused copy leaves nothing')

  // 13. Image transformations (`transform`): a resized copy in the image's
  // own format, for download, a signed URL (the transformation is in the
  // token) and a public URL.
  const pic = pngOf(40, 20)
  ok(await files.upload('img/pic.png', pic, { contentType: 'image/png' }), 'upload a png')
  const sizeOf = async (blobOrResponse) => {
    const b = Buffer.from(await blobOrResponse.arrayBuffer())
    assert.equal(b.subarray(1, 4).toString(), 'PNG', 'still a PNG')
    return [b.readUInt32BE(16), b.readUInt32BE(20)]
  }
  assert.deepEqual(await sizeOf(ok(await files.download('img/pic.png', { transform: { width: 20 } }), 'download transformed')), [20, 10])
  assert.deepEqual(await sizeOf(ok(await files.download('img/pic.png', { transform: { width: 10, height: 10, resize: 'contain' } }), 'contain')), [10, 5])
  const signedImg = ok(await files.createSignedUrl('img/pic.png', 60, { transform: { width: 10, height: 10 } }), 'sign transformed')
  assert.match(signedImg.signedUrl, /\/render\/image\/sign\//)
  res = await fetch(signedImg.signedUrl)
  assert.equal(res.status, 200)
  assert.deepEqual(await sizeOf(res), [10, 10], 'cover: the token\'s size')
  res = await fetch(signedImg.signedUrl.replace('token=', 'width=30&token='))
  assert.deepEqual(await sizeOf(res), [10, 10], 'the query cannot change a signed transformation')
  res = await fetch(signedImg.signedUrl.replace('/render/image/sign/', '/object/sign/'))
  assert.equal(res.status, 400, 'nor does the token give the original')
  const pub = `pub-${tag}`
  ok(await service.storage.createBucket(pub, { public: true }), 'public bucket')
  ok(await alice.storage.from(pub).upload('pic.png', pic, { contentType: 'image/png' }), 'upload in public')
  const publicUrl = client().storage.from(pub).getPublicUrl('pic.png', { transform: { height: 5 } }).data.publicUrl
  assert.match(publicUrl, /\/render\/image\/public\//)
  res = await fetch(publicUrl)
  assert.equal(res.status, 200)
  assert.deepEqual(await sizeOf(res), [10, 5])
  // Refusals: not an image, bad options, another user's private image.
  assert.equal((await files.download('cm/src.txt', { transform: { width: 10 } })).error?.statusCode, '400')
  assert.equal((await files.download('img/pic.png', { transform: { width: 5000 } })).error?.statusCode, '400')
  assert.equal((await bobFiles.download('img/pic.png', { transform: { width: 10 } })).error?.statusCode, '404')
})

