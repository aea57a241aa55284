-- Four eyes compares owners as `release` normalizes them: ASCII letters lowercased.
--
-- Owners are lowercased when a token is made (issue 10), but tokens made before keep their
-- rows as written (a token row is never rewritten), and so do the releases they requested.
-- `Alice` and `alice` are one person: the trigger that refuses an approval by the requester's
-- owner compares `lower()` of both sides, which folds the same ASCII letters as the code's
-- `to_ascii_lowercase` (this SQLite has no ICU).

DROP TRIGGER approvals_need_four_eyes;
CREATE TRIGGER approvals_need_four_eyes BEFORE INSERT ON approvals
WHEN NEW.decision = 'approved'
 AND lower(NEW.decider_owner) = lower((SELECT requester_owner FROM releases WHERE id = NEW.release_id))
BEGIN
    SELECT RAISE(ABORT, 'four eyes: the owner who requested a release may not approve it');
END;
