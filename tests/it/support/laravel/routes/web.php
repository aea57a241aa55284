<?php
use Illuminate\Support\Facades\Route;
Route::get('/version', function () {
    return config('app.version').' '.trim((string) @file_get_contents(base_path('REVISION')));
});
Route::get('/greeting', function () {
    return config('app.greeting');
});
