// supabase.storage against Aether's /storage/v1: buckets, upload (Buffer and
// Blob), list, download, signed URLs, public URLs, remove, and per-user access.
import { assert, client, email, main, ok, password, serviceKey } from './lib.mjs'

await main('storage', async () => {
  const alice = client()
  ok(await alice.auth.signUp({ email: email('alice'), password }), 'alice signUp')
  const bob = client()
  ok(await bob.auth.signUp({ email: email('bob'), password }), 'bob signUp')
  const tag = Math.random().toString(36).slice(2, 8)
  const priv = `docs-${tag}`
  const pub = `pub-${tag}`

  // Buckets.
  assert.deepEqual(ok(await alice.storage.createBucket(priv), 'createBucket'), { name: priv })
  ok(await alice.storage.createBucket(pub, { public: true, fileSizeLimit: '1MB' }), 'createBucket public')
  const dupBucket = await alice.storage.createBucket(priv)
  assert.equal(dupBucket.error?.statusCode, '409', JSON.stringify(dupBucket.error))
  const buckets = ok(await alice.storage.listBuckets(), 'listBuckets')
  assert.ok(buckets.some((b) => b.id === priv && b.public === false))
  assert.ok(buckets.some((b) => b.id === pub && b.public === true && b.file_size_limit === 1048576))
  assert.equal(ok(await alice.storage.getBucket(pub), 'getBucket').id, pub)
  const anon = client()
  assert.ok((await anon.storage.createBucket(`anon-${tag}`)).error, 'the anon key creates no bucket')

  // Uploads: a Buffer (raw body), a Blob (multipart), a name that needs escaping.
  const files = alice.storage.from(priv)
  const up1 = ok(await files.upload('folder/hello.txt', Buffer.from('hello world'), { contentType: 'text/plain' }), 'upload Buffer')
  assert.equal(up1.path, 'folder/hello.txt')
  assert.equal(up1.fullPath, `${priv}/folder/hello.txt`)
  assert.ok(up1.id)
  const blob = new Blob([new Uint8Array([1, 2, 3, 4, 5])], { type: 'application/octet-stream' })
  ok(await files.upload('folder/sub/data.bin', blob), 'upload Blob')
  ok(await files.upload('folder/a b ü (1).txt', Buffer.from('spaced')), 'upload odd name')
  const dup = await files.upload('folder/hello.txt', Buffer.from('again'))
  assert.equal(dup.error?.statusCode, '409', JSON.stringify(dup.error))
  ok(await files.upload('folder/hello.txt', Buffer.from('hello again'), { upsert: true, contentType: 'text/plain' }), 'upsert')

  // Listing: folders are entries with a null id.
  const root = ok(await files.list(), 'list root')
  assert.deepEqual(root.map((e) => [e.name, e.id]), [['folder', null]])
  const inFolder = ok(await files.list('folder'), 'list folder')
  assert.deepEqual(inFolder.map((e) => e.name), ['a b ü (1).txt', 'hello.txt', 'sub'])
  const hello = inFolder.find((e) => e.name === 'hello.txt')
  assert.equal(hello.metadata.size, 11)
  assert.equal(hello.metadata.mimetype, 'text/plain')
  assert.equal(inFolder.find((e) => e.name === 'sub').id, null)
  assert.deepEqual(ok(await files.list('folder', { search: 'hel' }), 'search').map((e) => e.name), ['hello.txt'])
  assert.deepEqual(ok(await files.list('folder', { limit: 1, offset: 1 }), 'page').map((e) => e.name), ['hello.txt'])
  const desc = ok(await files.list('folder', { sortBy: { column: 'name', order: 'desc' } }), 'desc')
  assert.deepEqual(desc.map((e) => e.name), ['sub', 'hello.txt', 'a b ü (1).txt'])
  assert.deepEqual(ok(await files.list('nothing-here'), 'empty'), [])

  // Download.
  assert.equal(await ok(await files.download('folder/hello.txt'), 'download').text(), 'hello again')
  const bytes = new Uint8Array(await ok(await files.download('folder/sub/data.bin'), 'download Blob').arrayBuffer())
  assert.deepEqual([...bytes], [1, 2, 3, 4, 5])
  assert.equal(await ok(await files.download('folder/a b ü (1).txt'), 'download odd').text(), 'spaced')
  const missing = await files.download('folder/nope.txt')
  assert.equal(missing.error?.statusCode, '404', JSON.stringify(missing.error))

  // Another user sees none of it; the service role sees it all.
  assert.equal((await bob.storage.from(priv).download('folder/hello.txt')).error?.statusCode, '404')
  assert.deepEqual(ok(await bob.storage.from(priv).list('folder'), 'bob list'), [])
  const service = client(serviceKey)
  assert.deepEqual(ok(await service.storage.from(priv).list('folder'), 'service list').map((e) => e.name), ['a b ü (1).txt', 'hello.txt', 'sub'])
  assert.equal(await ok(await service.storage.from(priv).download('folder/hello.txt'), 'service download').text(), 'hello again')

  // Signed URLs work without any key; a tampered token does not.
  const signed = ok(await files.createSignedUrl('folder/a b ü (1).txt', 60), 'createSignedUrl')
  let res = await fetch(signed.signedUrl)
  assert.equal(res.status, 200)
  assert.equal(await res.text(), 'spaced')
  res = await fetch(signed.signedUrl.replace(/token=.{8}/, 'token=AAAAAAAA'))
  assert.equal(res.status, 400)
  assert.ok((await bob.storage.from(priv).createSignedUrl('folder/hello.txt', 60)).error, 'bob cannot sign alice\'s file')

  // Public URLs: public buckets only.
  ok(await alice.storage.from(pub).upload('img/logo.txt', Buffer.from('public!')), 'upload public')
  const { data: { publicUrl } } = alice.storage.from(pub).getPublicUrl('img/logo.txt')
  res = await fetch(publicUrl)
  assert.equal(res.status, 200)
  assert.equal(await res.text(), 'public!')
  res = await fetch(alice.storage.from(priv).getPublicUrl('folder/hello.txt').data.publicUrl)
  assert.ok(res.status >= 400, 'no public URL for a private bucket')
  const tooBig = await alice.storage.from(pub).upload('big.bin', Buffer.alloc(1048577))
  assert.equal(tooBig.error?.statusCode, '413', JSON.stringify(tooBig.error))

  // Remove: returns what was removed; folders left empty disappear.
  const removed = ok(await files.remove(['folder/hello.txt', 'folder/sub/data.bin', 'folder/none.txt']), 'remove')
  assert.deepEqual(removed.map((o) => o.name).sort(), ['folder/hello.txt', 'folder/sub/data.bin'])
  assert.equal((await files.download('folder/hello.txt')).error?.statusCode, '404')
  assert.deepEqual(ok(await files.list('folder'), 'list after remove').map((e) => e.name), ['a b ü (1).txt'])
  // Bob's remove of alice's file removes nothing.
  assert.deepEqual(ok(await bob.storage.from(priv).remove(['folder/a b ü (1).txt']), 'bob remove'), [])
  assert.equal(await ok(await files.download('folder/a b ü (1).txt'), 'still there').text(), 'spaced')
})
