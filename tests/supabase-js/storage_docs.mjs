// Black-box checks of what docs/supabase.md (`/storage/v1`: Ownership,
// "Per-bucket access is RLS policies", "The seed routes use the same
// objects", signed URLs, "Image transformations") and docs/auth-files.md
// (Storage) promise, beyond what storage.mjs and storage_objects.mjs cover.
// Written from the documentation only.
import { assert, anonKey, client, email, main, ok, password, serviceKey, sql, url, pngOf } from './lib.mjs'

await main('storage-docs', async () => {
  const alice = client()
  ok(await alice.auth.signUp({ email: email('alice'), password }), 'alice signUp')
  const bob = client()
  ok(await bob.auth.signUp({ email: email('bob'), password }), 'bob signUp')
  const anon = client()
  const service = client(serviceKey)
  const aliceToken = (await alice.auth.getSession()).data.session.access_token
  const bobToken = (await bob.auth.getSession()).data.session.access_token
  const aliceId = (await alice.auth.getUser()).data.user.id
  const bobId = (await bob.auth.getUser()).data.user.id
  const tag = Math.random().toString(36).slice(2, 8)
  const text = async (r, what) => ok(await r, what).text()

  // Raw /storage/v1 requests, to see the error body's `code`.
  const api = (path, { method = 'GET', token = anonKey, apikey = anonKey, headers = {}, body } = {}) => {
    const h = { ...headers }
    if (apikey) h.apikey = apikey
    if (token) h.authorization = `Bearer ${token}`
    return fetch(`${url}/storage/v1${path}`, { method, headers: h, body })
  }
  const ownerOf = async (bucket, path) => {
    const rows = ok(await service.from('files').select('owner_id').eq('bucket_id', bucket).eq('path', path), `owner of ${path}`)
    assert.equal(rows.length, 1, `one row for ${bucket}/${path}: ${JSON.stringify(rows)}`)
    return rows[0].owner_id
  }

  const priv = `own-${tag}`
  ok(await alice.storage.createBucket(priv), 'createBucket private')
  const aliceFiles = alice.storage.from(priv)
  const bobFiles = bob.storage.from(priv)
  const svcFiles = service.storage.from(priv)
  ok(await aliceFiles.upload('a.txt', Buffer.from('alice a'), { contentType: 'text/plain' }), 'alice upload a.txt')

  // ---- Ownership -------------------------------------------------------
  // "The anon key cannot write (403)" and the error shape
  // {"statusCode": "<http status>", "code", "error", "message"}.
  let res = await api(`/object/${priv}/anon.txt`, { method: 'POST', token: anonKey, headers: { 'content-type': 'text/plain' }, body: 'x' })
  let body = await res.json()
  assert.ok(res.status === 403 && body.code === 'AccessDenied', `Ownership: the anon key cannot write (403 AccessDenied): ${JSON.stringify(body)}`)
  assert.ok(body.statusCode === '403' && 'error' in body && 'message' in body, `Errors: {statusCode (a string), code, error, message}: ${JSON.stringify(body)}`)

  // "Another user's object in a private bucket is NoSuchKey."
  res = await api(`/object/${priv}/a.txt`, { token: bobToken })
  body = await res.json()
  assert.ok(res.status === 404 && body.code === 'NoSuchKey', `Ownership: another user's private object is 404 NoSuchKey: ${res.status} ${JSON.stringify(body)}`)

  // "Its owner (files.owner_id) is recorded ...: the user who created it."
  assert.equal(await ownerOf(priv, 'a.txt'), aliceId, 'Ownership: owner_id is the user who created the object')
  // "A replaced or moved object keeps its owner": the service role moves alice's.
  ok(await svcFiles.move('a.txt', 'moved/a.txt'), 'service moves alice\'s object')
  assert.equal(await ownerOf(priv, 'moved/a.txt'), aliceId, 'Ownership: an object the service role moved keeps its owner')
  // "Copy: ... to a new object of the caller's (owner-less for the service role)".
  ok(await svcFiles.copy('moved/a.txt', 'svc-copy.txt'), 'service copies alice\'s object')
  assert.equal(await ownerOf(priv, 'svc-copy.txt'), null, 'Copy: the service role\'s copy of a user\'s object is owner-less')
  // "Create: ... nobody else creates [under another user's folder] (403)" also
  // by copy and by a signed upload URL ("under the rules of upload").
  ok(await bobFiles.upload('bob.txt', Buffer.from('bob'), { contentType: 'text/plain' }), 'bob upload in alice\'s bucket')
  assert.equal((await bobFiles.copy('bob.txt', `${aliceId}/from-bob.txt`)).error?.statusCode, '403', 'Create: bob cannot copy into alice\'s folder')
  assert.equal((await bobFiles.createSignedUploadUrl(`${aliceId}/signed.txt`)).error?.statusCode, '403', 'createSignedUploadUrl: under the rules of upload (not in another user\'s folder)')


  // ---- Public buckets: "anyone in a public bucket" reads -----------------
  const pub = `pubd-${tag}`
  ok(await service.storage.createBucket(pub, { public: true }), 'public bucket')
  const alicePub = alice.storage.from(pub)
  const bobPub = bob.storage.from(pub)
  ok(await alicePub.upload('p.txt', Buffer.from('public p'), { contentType: 'text/plain' }), 'alice upload in public')
  assert.equal(await text(bobPub.download('p.txt'), 'bob downloads alice\'s public object'), 'public p', 'Read: anyone in a public bucket (download)')
  assert.equal(ok(await anon.storage.from(pub).exists('p.txt'), 'anon exists public'), true, 'Read: anyone in a public bucket (exists, anon key)')
  // "Replace, move, remove: the owner and the service role" — reading is not changing.
  assert.equal((await bobPub.upload('p.txt', Buffer.from('bob'), { upsert: true })).error?.statusCode, '403', 'Replace: with x-upsert another user\'s object is 403, public bucket too')
  assert.equal((await bobPub.move('p.txt', 'bob-p.txt')).error?.statusCode, '403', 'Move: not another user\'s object (readable: 403)')
  // "Copy: from an object the caller may read, to a new object of the caller's".
  ok(await bobPub.copy('p.txt', 'bob-copy.txt'), 'bob copies alice\'s public object')
  assert.equal(await ownerOf(pub, 'bob-copy.txt'), bobId, 'Copy: a copy of another\'s readable object is the copier\'s')
  // "List: what the caller may read (the service role: everything; the anon key: nothing)".
  const bobList = ok(await bobPub.list(), 'bob lists public').map((e) => e.name)
  assert.ok(bobList.includes('p.txt'), `List: what the caller may read (alice's public object for bob): ${JSON.stringify(bobList)}`)
  const anonList = ok(await anon.storage.from(pub).list(), 'anon lists public')
  assert.deepEqual(anonList, [], 'List: the anon key lists nothing')
  // The seed read route serves the same object (auth-files.md: public bucket, no token).
  ok(await alicePub.upload(`${aliceId}/seen.txt`, Buffer.from('seen by seed'), { contentType: 'text/plain' }), 'upload in alice\'s public folder')
  res = await fetch(`${url}/storage/object/${pub}/${aliceId}/seen.txt`)
  assert.equal(res.status === 200 && await res.text(), 'seen by seed', 'Seed read: public bucket, no token needed, same object as /storage/v1')

  // ---- Signed URLs -------------------------------------------------------
  ok(await aliceFiles.upload('s/one.txt', Buffer.from('first'), { contentType: 'text/plain' }), 'upload s/one.txt')
  const signed = ok(await aliceFiles.createSignedUrl('s/one.txt', 600), 'createSignedUrl')
  assert.equal(await (await fetch(signed.signedUrl)).text(), 'first', 'createSignedUrl: anyone holding the URL reads the object')
  ok(await aliceFiles.remove(['s/one.txt']), 'remove s/one.txt')
  ok(await aliceFiles.upload('s/one.txt', Buffer.from('second'), { contentType: 'text/plain' }), 're-upload s/one.txt')
  res = await fetch(signed.signedUrl)
  assert.equal(res.status, 404, 'createSignedUrl: not another object that later takes its name (404)')
  // createSignedUrls: one {error,path,signedURL} per path, an error for one that cannot be signed.
  const many = ok(await aliceFiles.createSignedUrls(['s/one.txt', 's/missing.txt'], 60), 'createSignedUrls')
  assert.ok(many.length === 2 && many[0].error === null && many[0].signedURL && many[0].path === 's/one.txt', `createSignedUrls: a signable path has a URL: ${JSON.stringify(many[0])}`)
  assert.ok(many[1].error && !many[1].signedURL, `createSignedUrls: an error for a path that cannot be signed: ${JSON.stringify(many[1])}`)
  // "a bad ... expiresIn" is 400 InvalidRequest.
  res = await api(`/object/sign/${priv}/s/one.txt`, { method: 'POST', token: aliceToken, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ expiresIn: -1 }) })
  body = await res.json()
  assert.ok(res.status === 400 && body.code === 'InvalidRequest', `Errors: a bad expiresIn is 400 InvalidRequest: ${res.status} ${JSON.stringify(body)}`)
  // "until it expires": an expired signed URL is 400 InvalidSignature.
  const short = ok(await aliceFiles.createSignedUrl('s/one.txt', 1), 'createSignedUrl 1 s')
  await new Promise((r) => setTimeout(r, 2500))
  res = await fetch(short.signedUrl)
  body = await res.json().catch(() => null)
  assert.ok(res.status === 400 && body?.code === 'InvalidSignature', `Signed URL: an expired token is 400 InvalidSignature: ${res.status} ${JSON.stringify(body)}`)

  // ---- Policies ----------------------------------------------------------
  // "Aether's default policies on public.files (aether_read, aether_create, aether_change, aether_remove)".
  await sql(`DO $$ BEGIN
      IF (SELECT count(*) FROM pg_policies WHERE schemaname = 'public' AND tablename = 'files'
            AND policyname IN ('aether_read', 'aether_create', 'aether_change', 'aether_remove')) <> 4
      THEN RAISE EXCEPTION 'default storage policies missing'; END IF; END $$`)
  const pol = `pol-${tag}`
  ok(await service.storage.createBucket(pol), 'policy bucket')
  const alicePol = alice.storage.from(pol)
  const bobPol = bob.storage.from(pol)
  ok(await alicePol.upload('plan.txt', Buffer.from('plan'), { contentType: 'text/plain' }), 'alice plan')
  ok(await alicePol.upload('secret.txt', Buffer.from('secret'), { contentType: 'text/plain' }), 'alice secret')
  ok(await alicePol.upload('gone.txt', Buffer.from('gone'), { contentType: 'text/plain' }), 'alice gone')

  // A restrictive SELECT with storage.filename narrows even the owner.
  await sql(`CREATE POLICY "no secrets ${tag}" ON public.files AS RESTRICTIVE FOR SELECT TO authenticated
               USING (bucket_id <> '${pol}' OR storage.filename(path) <> 'secret.txt')`)
  assert.equal((await alicePol.download('secret.txt')).error?.statusCode, '404', 'Policies: a restrictive SELECT (storage.filename) hides even the owner\'s object')
  await sql(`DROP POLICY "no secrets ${tag}" ON public.files`)

  // auth.role() works in a policy.
  await sql(`CREATE POLICY "signed-in read ${tag}" ON public.files FOR SELECT
               USING (bucket_id = '${pol}' AND auth.role() = 'authenticated')`)
  assert.equal(await text(bobPol.download('plan.txt'), 'bob reads via auth.role()'), 'plan', 'Policies: auth.role() = authenticated opens reads')
  assert.equal((await anon.storage.from(pol).download('plan.txt')).error?.statusCode, '404', 'Policies: auth.role() is anon for the anon key')
  // A permissive UPDATE lets bob replace alice's object, which stays hers.
  await sql(`CREATE POLICY "team replaces ${tag}" ON public.files FOR UPDATE TO authenticated
               USING (bucket_id = '${pol}') WITH CHECK (bucket_id = '${pol}')`)
  ok(await bobPol.upload('plan.txt', Buffer.from('plan by bob'), { upsert: true, contentType: 'text/plain' }), 'bob replaces with the UPDATE policy')
  assert.equal(await text(alicePol.download('plan.txt'), 'alice reads the replacement'), 'plan by bob', 'Policies: an upsert of a taken name is judged as an UPDATE')
  assert.equal(await ownerOf(pol, 'plan.txt'), aliceId, 'Ownership: a replaced object keeps its owner')
  // A permissive DELETE lets bob remove it.
  await sql(`CREATE POLICY "team removes ${tag}" ON public.files FOR DELETE TO authenticated USING (bucket_id = '${pol}')`)
  const removed = ok(await bobPol.remove(['gone.txt']), 'bob removes with the DELETE policy')
  assert.deepEqual(removed.map((o) => o.name), ['gone.txt'], 'Policies: remove is a DELETE a permissive policy opens')
  await sql(`DROP POLICY "signed-in read ${tag}" ON public.files; DROP POLICY "team replaces ${tag}" ON public.files; DROP POLICY "team removes ${tag}" ON public.files`)

  // "A new object's write is judged as an INSERT of its row first, before
  // anything about the name is told": a refused INSERT at a taken name is 403, not 409.
  await sql(`CREATE POLICY "closed ${tag}" ON public.files AS RESTRICTIVE FOR INSERT TO authenticated WITH CHECK (bucket_id <> '${pol}')`)
  assert.equal((await alicePol.upload('plan.txt', Buffer.from('x'))).error?.statusCode, '403', 'Policies: INSERT judged before the name is told (403, not 409)')
  // auth-files.md: "a DBA's restrictive policy refuses an upload here too (403 auth/forbidden)".
  const seedUpload = (token, bucket, path, bytes, upsert = false) => {
    const form = new FormData()
    form.append('bucket', bucket)
    form.append('path', path)
    form.append('file', new Blob([bytes], { type: 'application/pdf' }), path.split('/').pop())
    return fetch(`${url}/storage/upload`, { method: 'POST', headers: { authorization: `Bearer ${token}`, ...(upsert ? { 'x-upsert': 'true' } : {}) }, body: form })
  }
  res = await seedUpload(aliceToken, pol, 'docs/refused.pdf', Buffer.from('%PDF-1.4 x'))
  body = await res.json()
  assert.ok(res.status === 403 && body.error?.code === 'auth/forbidden', `auth-files.md: a restrictive policy refuses a seed upload (403 auth/forbidden): ${res.status} ${JSON.stringify(body)}`)
  await sql(`DROP POLICY "closed ${tag}" ON public.files`)

  // move: "USING on the object, WITH CHECK on its new name".
  await sql(`CREATE POLICY "no locked ${tag}" ON public.files AS RESTRICTIVE FOR UPDATE TO authenticated
               USING (true) WITH CHECK (bucket_id <> '${pol}' OR (storage.foldername(path))[1] IS DISTINCT FROM 'locked')`)
  assert.equal((await alicePol.move('secret.txt', 'locked/secret.txt')).error?.statusCode, '403', 'Policies: move is an UPDATE with WITH CHECK on the new name')
  ok(await alicePol.move('secret.txt', 'open/secret.txt'), 'move elsewhere is allowed')
  await sql(`DROP POLICY "no locked ${tag}" ON public.files`)

  // storage.home(path): the user whose folder a path is in.
  await sql(`CREATE POLICY "home only ${tag}" ON public.files AS RESTRICTIVE FOR INSERT TO authenticated
               WITH CHECK (bucket_id <> '${pol}' OR storage.home(path)::text = auth.uid()::text)`)
  assert.equal((await alicePol.upload('outside.txt', Buffer.from('x'))).error?.statusCode, '403', 'Policies: storage.home(path) is null outside a user folder')
  ok(await alicePol.upload(`${aliceId}/inside.txt`, Buffer.from('x'), { contentType: 'text/plain' }), 'storage.home(path) = auth.uid() in her folder')
  await sql(`DROP POLICY "home only ${tag}" ON public.files`)

  // ---- The seed routes use the same objects ------------------------------
  const seedBucket = `seed-${tag}`
  ok(await service.storage.createBucket(seedBucket), 'seed bucket')
  const aliceSeed = alice.storage.from(seedBucket)
  res = await seedUpload(aliceToken, seedBucket, 'docs/a.pdf', Buffer.from('%PDF-1.4 seed a'))
  body = await res.json()
  assert.equal(res.status === 201 && body.path, 'docs/a.pdf', 'Seed routes: answers keep the path relative to the user\'s folder')
  assert.ok(body.url.endsWith(`/storage/object/${seedBucket}/${aliceId}/docs/a.pdf`), `auth-files.md: url is /storage/object/{bucket}/{owner_id}/{path}: ${body.url}`)
  const seedInfo = ok(await aliceSeed.info(`${aliceId}/docs/a.pdf`), 'info of the seed upload')
  assert.equal(seedInfo.id, body.id, 'Seed routes: docs/a.pdf is the object <user id>/docs/a.pdf (same id)')
  const seedRow = ok(await service.from('files').select('path').eq('id', body.id), 'seed row')
  assert.equal(seedRow[0].path, `${aliceId}/docs/a.pdf`, 'Seed routes: a files row\'s path is the object\'s full name')
  // Two users may both have docs/a.pdf in one bucket.
  res = await seedUpload(bobToken, seedBucket, 'docs/a.pdf', Buffer.from('%PDF-1.4 bob a'))
  assert.equal(res.status, 201, 'auth-files.md: two users may both have docs/a.pdf in one bucket')
  // An object made by supabase-js is the seed route's to refuse (409) or replace (x-upsert).
  ok(await aliceSeed.upload(`${aliceId}/docs/b.pdf`, Buffer.from('%PDF-1.4 js b'), { contentType: 'application/pdf' }), 'js upload docs/b.pdf')
  res = await seedUpload(aliceToken, seedBucket, 'docs/b.pdf', Buffer.from('%PDF-1.4 seed b'))
  body = await res.json()
  assert.ok(res.status === 409 && body.error?.code === 'storage/already-exists', `Seed upload over a supabase-js object: 409 storage/already-exists: ${res.status} ${JSON.stringify(body)}`)
  res = await seedUpload(aliceToken, seedBucket, 'docs/b.pdf', Buffer.from('%PDF-1.4 seed b'), true)
  assert.equal(res.status, 201, 'Seed upload with x-upsert replaces the supabase-js object')
  assert.equal(await text(aliceSeed.download(`${aliceId}/docs/b.pdf`), 'replaced by seed'), '%PDF-1.4 seed b', 'Seed routes: supabase-js reads what the seed route wrote')
  // DELETE /storage/delete removes the object supabase-js sees.
  res = await fetch(`${url}/storage/delete`, {
    method: 'DELETE',
    headers: { authorization: `Bearer ${aliceToken}`, 'content-type': 'application/json' },
    body: JSON.stringify({ bucket: seedBucket, path: 'docs/b.pdf' }),
  })
  assert.ok(res.status === 200 && (await aliceSeed.download(`${aliceId}/docs/b.pdf`)).error?.statusCode === '404', 'Seed routes: a seed delete removes the /storage/v1 object')
  // supabase-js remove shows in the seed listing.
  ok(await aliceSeed.upload(`${aliceId}/docs/c.pdf`, Buffer.from('%PDF-1.4 js c'), { contentType: 'application/pdf' }), 'js upload docs/c.pdf')
  ok(await aliceSeed.remove([`${aliceId}/docs/a.pdf`]), 'js remove docs/a.pdf')
  res = await fetch(`${url}/storage/list?bucket=${seedBucket}&path=docs`, { headers: { authorization: `Bearer ${aliceToken}` } })
  body = await res.json()
  assert.deepEqual(body.files?.map((f) => f.path), ['docs/c.pdf'], `Seed routes: the seed list sees supabase-js's remove and upload: ${JSON.stringify(body)}`)

  // ---- Image transformations ---------------------------------------------
  const img = `img-${tag}`
  ok(await alice.storage.createBucket(img), 'image bucket')
  const aliceImg = alice.storage.from(img)
  ok(await aliceImg.upload('pic.png', pngOf(40, 20), { contentType: 'image/png' }), 'upload 40x20 png')
  const sizeOf = async (blobOrResponse) => {
    const b = Buffer.from(await blobOrResponse.arrayBuffer())
    assert.equal(b.subarray(1, 4).toString(), 'PNG', 'Transform: the image keeps its format')
    return [b.readUInt32BE(16), b.readUInt32BE(20)]
  }
  assert.deepEqual(await sizeOf(ok(await aliceImg.download('pic.png', { transform: { width: 30, height: 5, resize: 'fill' } }), 'fill')), [30, 5], 'Transform: fill stretches to both sizes')
  assert.deepEqual(await sizeOf(ok(await aliceImg.download('pic.png', { transform: { height: 10, format: 'origin' } }), 'origin')), [20, 10], 'Transform: format origin, height alone keeps the aspect ratio')
  const render = (query, token = aliceToken) => api(`/render/image/authenticated/${img}/pic.png?${query}`, { token })
  assert.deepEqual(await sizeOf(await render('width=2500')), [2500, 1250], 'Transform: width 2500 is within 1-2,500')
  for (const [query, claim] of [
    ['width=0', 'width below 1'],
    ['width=10&resize=stretch', 'resize not cover/contain/fill'],
    ['width=10&quality=19', 'quality below 20'],
    ['width=10&format=webp', 'format other than origin'],
  ]) {
    res = await render(query)
    body = await res.json().catch(() => null)
    assert.ok(res.status === 400 && body?.code === 'InvalidRequest', `Transform: ${claim} is 400 InvalidRequest: ${res.status} ${JSON.stringify(body)}`)
  }
  // Not an image (even labelled image/png) is 400 InvalidRequest.
  ok(await aliceImg.upload('fake.png', Buffer.from('not a png at all'), { contentType: 'image/png' }), 'upload fake png')
  res = await api(`/render/image/authenticated/${img}/fake.png?width=10`, { token: aliceToken })
  body = await res.json().catch(() => null)
  assert.ok(res.status === 400 && body?.code === 'InvalidRequest', `Transform: not an image is 400 InvalidRequest: ${res.status} ${JSON.stringify(body)}`)
  // "Reads are authorized as download is": the service role, and anyone in a public bucket.
  assert.deepEqual(await sizeOf(ok(await service.storage.from(img).download('pic.png', { transform: { width: 20 } }), 'service transform')), [20, 10], 'Transform: the service role reads any object')
  res = await fetch(`${url}/storage/v1/render/image/public/${img}/pic.png?width=20`)
  assert.ok(res.status >= 400, `Transform: /render/image/public/ does not serve a private bucket (${res.status})`)
  ok(await alicePub.upload('pic.png', pngOf(40, 20), { contentType: 'image/png' }), 'png in the public bucket')
  assert.deepEqual(await sizeOf(ok(await bobPub.download('pic.png', { transform: { width: 20 } }), 'bob transforms a public image')), [20, 10], 'Transform: anyone reads in a public bucket')
  // "Results are not cached: each request transforms again."
  ok(await aliceImg.upload('pic.png', pngOf(20, 40), { contentType: 'image/png', upsert: true }), 'replace with 20x40')
  assert.deepEqual(await sizeOf(ok(await aliceImg.download('pic.png', { transform: { width: 10 } }), 'after replace')), [10, 20], 'Transform: not cached, the replaced image is transformed')
})

