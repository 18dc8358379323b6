-- A folder is readable to whoever may read a file under it (0017's
-- `aether_read` on public.folders). That policy found "a file under this
-- folder" with starts_with(), which no index serves: listing the folders of
-- a bucket scanned the bucket's files once per folder. A file is under
-- folder `p` exactly when its path is in ['p/', 'p0') in byte order ('0'
-- follows '/'), which a C-collated index on (bucket_id, path) serves; the
-- starts_with() stays as the definition and costs nothing per row found.

CREATE INDEX IF NOT EXISTS files_bucket_path_bytes
    ON public.files (bucket_id, path COLLATE "C");

DO $$
BEGIN
    -- Only where 0017 could set the policies up (the roles exist).
    IF EXISTS (SELECT 1 FROM pg_policies
                WHERE schemaname = 'public' AND tablename = 'folders'
                  AND policyname = 'aether_read') THEN
        ALTER POLICY aether_read ON public.folders
            USING (owner_id = auth.uid()
                   OR EXISTS (SELECT 1 FROM public.buckets b WHERE b.id = bucket_id AND b.public)
                   OR EXISTS (SELECT 1 FROM public.files x
                              WHERE x.bucket_id = folders.bucket_id
                                AND x.path COLLATE "C" >= folders.path || '/'
                                AND x.path COLLATE "C" < folders.path || '0'
                                AND starts_with(x.path, folders.path || '/')));
    END IF;
END
$$;
