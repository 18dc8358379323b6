-- Storage objects are named by bucket and path, as on Supabase and S3
-- (issue 15): the owner is recorded, not part of the key. The seed routes
-- keep a user's files under a folder named after the user id, so every
-- owned row moves to `<owner id>/<path>` unless it is already there (a
-- /storage/v1 upload that followed Supabase's `<user id>/…` convention).
-- A user's home folder (`<user id>`) has no row: what is directly in it has
-- folder_id / parent_id NULL, as a user's root always had.

-- Where each owned row goes.
CREATE TEMP TABLE moved_folders ON COMMIT DROP AS
SELECT id, bucket_id, owner_id::text || '/' || path AS new_path
FROM public.folders
WHERE owner_id IS NOT NULL
  AND path <> owner_id::text
  AND NOT starts_with(path, owner_id::text || '/');

-- A folder that lands on an existing one is merged into it.
CREATE TEMP TABLE merged_folders ON COMMIT DROP AS
SELECT m.id AS old_id, f.id AS new_id
FROM moved_folders m
JOIN public.folders f ON f.bucket_id = m.bucket_id AND f.path = m.new_path;

UPDATE public.files x SET folder_id = g.new_id
FROM merged_folders g WHERE x.folder_id = g.old_id;
UPDATE public.folders x SET parent_id = g.new_id
FROM merged_folders g WHERE x.parent_id = g.old_id;
DELETE FROM public.folders WHERE id IN (SELECT old_id FROM merged_folders);

UPDATE public.folders f SET path = m.new_path
FROM moved_folders m
WHERE f.id = m.id AND m.id NOT IN (SELECT old_id FROM merged_folders);

-- Files; one that lands on an existing object's name keeps its folder and
-- gets its id's first eight digits before its extension:
-- `docs/a.pdf` → `<user id>/docs/a (1a2b3c4d).pdf`.
CREATE TEMP TABLE moved_files ON COMMIT DROP AS
SELECT id, bucket_id, owner_id::text || '/' || path AS new_path
FROM public.files
WHERE owner_id IS NOT NULL
  AND NOT starts_with(path, owner_id::text || '/');

UPDATE public.files x SET
    path = CASE WHEN taken.id IS NULL THEN m.new_path
                ELSE regexp_replace(m.new_path, '(\.[^./]*)?$', ' (' || left(x.id::text, 8) || ')\1') END,
    name = CASE WHEN taken.id IS NULL THEN x.name
                ELSE regexp_replace(x.name, '(\.[^./]*)?$', ' (' || left(x.id::text, 8) || ')\1') END
FROM moved_files m
LEFT JOIN public.files taken ON taken.bucket_id = m.bucket_id AND taken.path = m.new_path
WHERE x.id = m.id;

-- Home folders have no row.
UPDATE public.files SET folder_id = NULL
WHERE folder_id IN (SELECT id FROM public.folders
                    WHERE path ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$');
UPDATE public.folders SET parent_id = NULL
WHERE parent_id IN (SELECT id FROM public.folders
                    WHERE path ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$');
DELETE FROM public.folders
WHERE path ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$';

-- One object per bucket and name.
DO $$
DECLARE c record;
BEGIN
    FOR c IN SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
             WHERE contype = 'u'
               AND conrelid IN ('public.files'::regclass, 'public.folders'::regclass)
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.tbl, c.conname);
    END LOOP;
END
$$;
ALTER TABLE public.files ADD CONSTRAINT files_bucket_id_path_key UNIQUE (bucket_id, path);
ALTER TABLE public.folders ADD CONSTRAINT folders_bucket_id_path_key UNIQUE (bucket_id, path);
